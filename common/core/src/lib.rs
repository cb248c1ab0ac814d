//! Tessera's types and maths, with no I/O: the model families, the render spec and its checks,
//! the plan, tiling geometry, pixel resize, schedulers, the methods' math, seeded noise, task
//! descriptions and the tensor codec.
pub mod codec;
pub mod describe;
pub mod error;
pub mod family;
pub mod method;
pub mod noise;
pub mod partial;
pub mod plan;
pub mod resize;
pub mod sched;
pub mod spec;
pub mod task;
pub mod tiling;
pub mod view_batch;
