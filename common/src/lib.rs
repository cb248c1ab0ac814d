//! Shared types, geometry, schedulers, the methods' math, the plan and the store.
pub mod codec;
pub mod method;
pub mod noise;
pub mod plan;
pub mod resize;
pub mod sched;
pub mod spec;
pub mod store;
pub mod task;
pub mod testing;
pub mod tiling;
