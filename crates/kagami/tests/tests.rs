//! kagami's integration tests: one binary (see ripgrep), one module per area.

mod support;

mod check;
mod containerd;
mod explain;
