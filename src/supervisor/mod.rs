//! The supervisor: how agent processes are started, stopped, reaped and
//! restarted. `process` owns the operating-system side; `policy` the pure
//! restart rules (backoff, intensity). The replica loops that use them live
//! in the dispatcher.

pub mod policy;
pub mod process;
