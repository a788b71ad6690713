//! Subcommands, one module each.

pub mod flows;
pub mod status;
