//! The contract's adversarial data: x = 1e4 + N(0, 1) in f32 with M = 1e7 values per
//! channel. The variance must stay within 1e-4 relative (the harness holds it to 1e-5);
//! a naive f32 sum of squares is off by orders of magnitude on the same data.

use bnorm::check::{adversarial_suite, generate, run_case, Data, Rng};
use bnorm::{Device, Shape};

#[test]
fn offset_data_with_ten_million_values_per_channel() {
    for spec in adversarial_suite(10_000_000) {
        let r = run_case(&Device::cpu(), &spec).unwrap();
        for (name, c) in &r.outputs {
            eprintln!("{}: {name} max_rel {:.2e} ratio {:.3}", spec.label(), c.max_rel, c.worst_ratio);
        }
        assert!(r.passed(), "{}: {:?}", spec.label(), r.worst());
        if let Some((_, var)) = r.outputs.iter().find(|(n, _)| *n == "running_var") {
            // momentum 1: running_var is the (unbiased) batch variance
            assert!(var.max_rel <= 1e-4, "variance relative error {:.2e}", var.max_rel);
        }
    }
}

/// The same data through E[x^2] - E[x]^2 in f32 misses the variance by far more than
/// 1e-4: what the test above guards against.
#[test]
fn naive_sum_of_squares_fails_on_the_same_data() {
    let shape = Shape::channels_first(&[4, 1, 2_500_000]).unwrap();
    let x: Vec<f32> = generate(&mut Rng::new(7), &shape, Data::Offset(1e4));
    let n = x.len() as f32;
    let (s, q) = x.iter().fold((0f32, 0f32), |(s, q), &v| (s + v, q + v * v));
    let naive = q / n - (s / n) * (s / n);
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let exact = bnorm::stats::Moments::of(&xs).var_biased();
    assert!(((naive as f64) - exact).abs() / exact > 1e-2, "naive {naive} exact {exact}");
}
