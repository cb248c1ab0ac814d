//! Shared types, geometry, schedulers and method math.
pub mod method;
pub mod noise;
pub mod sched;
pub mod spec;
pub mod tiling;
