//! Tables shared by all workers. Lock-free on the packet path, fixed
//! capacity, allocated once at start-up.

pub mod flow;

pub use flow::{FlowKey, FlowTable, FlowValue, ForwardKey, PersistKey, TableKey, Upsert};
