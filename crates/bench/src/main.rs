//! Benchmark harness (being written): see BENCHMARKS.md.
fn main() {}
