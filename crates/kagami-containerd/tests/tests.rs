//! kagami-containerd's integration tests: one binary, one module per area, against a real
//! containerd (1.6, as Debian ships it) started by the test and stopped by PID.

mod real_containerd;
