//! pdump's one integration test binary (`autotests = false`): real processes
//! are seized, infected, dumped. Tests that need root call
//! `util::require_root` (skips loudly outside CI, never with CI=true).
mod core;
mod cow;
mod dump;
mod fault;
mod golden;
mod infect;
mod leaks;
mod pages;
mod restore;
mod restore_files;
mod tree;
pub mod util;
