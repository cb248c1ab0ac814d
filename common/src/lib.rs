//! Shared types, geometry, schedulers and method math.
pub mod method;
pub mod noise;
pub mod spec;
pub mod sched;
pub mod tiling;
