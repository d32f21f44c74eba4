//! The PyTorch peer script keeps its own copy of the benchmark shapes (it runs where no
//! Rust toolchain is): it must list exactly `bnorm::suites`' shapes, in the same order, or
//! the merged tables would pair different cases.

use bnorm::suites::{RESNET50_CHW, RESNET50_EXTRA, SMOKE};

/// The tuples of the Python list assigned to `name` (`NAME = [(1, 2), (3, 4, 5)]`,
/// possibly over several lines).
fn python_tuples(src: &str, name: &str) -> Vec<Vec<usize>> {
    let start = src.find(&format!("\n{name} = [")).unwrap_or_else(|| panic!("{name} not in ci/torch_bench.py"));
    let body = &src[start + name.len() + 5..];
    let body = &body[..body.find(']').expect("closing ]")];
    body.split(')')
        .filter_map(|t| t.split_once('('))
        .map(|(_, nums)| nums.split(',').filter(|n| !n.trim().is_empty()).map(|n| n.trim().parse().unwrap()).collect())
        .collect()
}

#[test]
fn torch_bench_lists_the_library_shapes() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ci/torch_bench.py")).unwrap();
    let chw: Vec<Vec<usize>> = RESNET50_CHW.iter().map(|&(c, h, w)| vec![c, h, w]).collect();
    assert_eq!(python_tuples(&src, "RESNET50_CHW"), chw);
    let extra: Vec<Vec<usize>> = RESNET50_EXTRA.iter().map(|d| d.to_vec()).collect();
    assert_eq!(python_tuples(&src, "RESNET50_FIXED"), extra);
    let smoke: Vec<Vec<usize>> = SMOKE.iter().map(|d| d.to_vec()).collect();
    assert_eq!(python_tuples(&src, "SMOKE_FIXED"), smoke);
}

#[test]
fn python_tuples_reads_multiline_lists() {
    let src = "x = 1\nA = [\n    (1, 2, 3), (4, 5,\n 6),\n]\nB = [(7, 8)]\n";
    assert_eq!(python_tuples(src, "A"), vec![vec![1, 2, 3], vec![4, 5, 6]]);
    assert_eq!(python_tuples(src, "B"), vec![vec![7, 8]]);
}
