// Streamed (non-temporal) against cached stores for a normalize pass, alone and followed
// by a pass that reads its output (as the next layer would): the measurement behind
// bnorm's Stores::Auto threshold (docs/BENCHMARKS.md, third run of 2026-11-27).
// Build and run: gcc -O2 -mavx512f -fopenmp ci/stream_probe.c -o /tmp/stream_probe &&
//   OMP_NUM_THREADS=2 /tmp/stream_probe 21    (21 = repetitions; medians printed)

#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <string.h>
static double now(){return omp_get_wtime();}
static void norm(const float*x,float*y,size_t n,int nt){
  #pragma omp parallel
  { int t=omp_get_thread_num(),T=omp_get_num_threads(); size_t a=n*t/T/16*16,b=(t==T-1)?n:n*(t+1)/T/16*16;
    __m512 m=_mm512_set1_ps(0.5f),s=_mm512_set1_ps(1.5f),h=_mm512_set1_ps(0.1f);
    if(nt){for(size_t i=a;i<b;i+=16)_mm512_stream_ps(y+i,_mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x+i),m),s,h));_mm_sfence();}
    else for(size_t i=a;i<b;i+=16)_mm512_store_ps(y+i,_mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x+i),m),s,h));
  }
}
static float consume(const float*y,size_t n){float tot=0;
  #pragma omp parallel reduction(+:tot)
  { int t=omp_get_thread_num(),T=omp_get_num_threads(); size_t a=n*t/T/16*16,b=(t==T-1)?n:n*(t+1)/T/16*16;
    __m512 acc=_mm512_setzero_ps(); for(size_t i=a;i<b;i+=16)acc=_mm512_add_ps(acc,_mm512_load_ps(y+i)); tot+=_mm512_reduce_add_ps(acc);}
  return tot;}
static void cp(float*d,const float*s,size_t n){
  #pragma omp parallel
  { int t=omp_get_thread_num(),T=omp_get_num_threads(); size_t a=n*t/T/16*16,b=(t==T-1)?n:n*(t+1)/T/16*16; memcpy(d+a,s+a,(b-a)*4);} }
int cmp(const void*a,const void*b){double d=*(double*)a-*(double*)b;return d<0?-1:d>0;}
int main(int argc,char**argv){
  double mbs[]={3.2,6.4,12.8,25.7,51.4,102.8}; int reps=argc>1?atoi(argv[1]):21; if(reps<1||reps>200)reps=21;
  for(int k=0;k<6;k++){ size_t n=(size_t)(mbs[k]*1e6/4)/16*16;
    float*x=aligned_alloc(64,n*4),*y=aligned_alloc(64,n*4);
    for(size_t i=0;i<n;i++){x[i]=i%7;y[i]=0;}
    double r[4][200]; float sink=0;
    for(int i=0;i<reps;i++){ for(int m=0;m<2;m++){
      // the same buffers every repetition, as bnorm bench does
      double t0=now(); norm(x,y,n,m); double t1=now(); sink+=consume(y,n); double t2=now();
      r[m][i]=(t1-t0)*1e3; r[2+m][i]=(t2-t0)*1e3; }}
    double c[200]; for(int i=0;i<reps;i++){double t0=now();cp(y,x,n);c[i]=(now()-t0)*1e3;}
    for(int m=0;m<4;m++)qsort(r[m],reps,sizeof(double),cmp);
    qsort(c,reps,sizeof(double),cmp);
    printf("%6.1f MB: cached %.3f nt %.3f (ratio %.2f) | +consume: cached %.3f nt %.3f (ratio %.2f) | memcpy %.3f  [%g]\n",mbs[k],r[0][reps/2],r[1][reps/2],r[1][reps/2]/r[0][reps/2],r[2][reps/2],r[3][reps/2],r[3][reps/2]/r[2][reps/2],c[reps/2],sink);
    free(x);free(y);}
}
