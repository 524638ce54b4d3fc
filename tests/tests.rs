//! pdump's one integration test binary (`autotests = false`): real processes
//! are seized, infected, dumped. Tests that need root call
//! `util::require_root` (skips loudly outside CI, never with CI=true).
mod cow;
mod dump;
mod fault;
mod golden;
mod infect;
mod leaks;
mod tree;
pub mod util;
