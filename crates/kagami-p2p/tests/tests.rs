//! Integration tests of kagami-p2p: the router conformance suite, run against every
//! implementation, and tests specific to the libp2p router. Every node lives on 127.0.0.0/8 and
//! every wait has a deadline.

mod conformance;
mod libp2p;
mod support;
