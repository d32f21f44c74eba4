//! Property tests: random shapes, layouts, dtypes, ops and fusions all agree with the
//! float64 reference.

use bnorm::check::{run_case, CaseSpec, Op};
use bnorm::{Activation, DType, Device, Layout, RunningStats};
use proptest::prelude::*;

fn spec() -> impl Strategy<Value = CaseSpec> {
    (
        prop::collection::vec(1usize..9, 0..4),
        1usize..6,
        1usize..40,
        0usize..4,
        0usize..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0usize..3,
        any::<u64>(),
    )
        .prop_map(|(spatial, n, c, op, dt, cl, add, relu, conv, seed)| {
            let mut dims = vec![n, c];
            dims.extend(spatial);
            let op = Op::ALL[op];
            // training needs two values per channel
            if dims[0] * dims[2..].iter().product::<usize>() < 2 {
                dims[0] = 2;
            }
            let layout = if cl { Layout::ChannelsLast } else { Layout::ChannelsFirst };
            let mut s = CaseSpec::new(op, &dims, layout, DType::ALL[dt]);
            s.residual = add;
            s.activation = if relu { Activation::Relu } else { Activation::Identity };
            s.running_stats =
                [RunningStats::Momentum(0.3), RunningStats::CumulativeAverage, RunningStats::Retention(0.95)][conv];
            s.affine = seed % 2 == 0;
            s.seed = seed;
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_cases_match_the_reference(s in spec()) {
        let r = run_case(&Device::cpu(), &s).unwrap();
        prop_assert!(r.passed(), "{}: {:?}", s.label(), r.worst());
    }
}
