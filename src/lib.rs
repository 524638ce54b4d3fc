//! pdump library.
pub mod blob;
