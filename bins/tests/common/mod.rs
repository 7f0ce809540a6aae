//! The tests' harness is the library's scratch environments.

#![allow(unused_imports)]

pub use stream_bins::scratch::*;
