//! Tables shared by all workers. Lock-free on the packet path, fixed
//! capacity, allocated once at start-up.

pub mod flow;
pub mod mem;

pub use flow::{
    Displaced, FlowKey, FlowTable, FlowValue, ForwardKey, Hint, PersistKey, Probe, TableKey, Upsert,
};
