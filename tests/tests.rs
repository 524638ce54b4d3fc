//! pdump's one integration test binary.
mod golden;
mod infect;
pub mod util;
