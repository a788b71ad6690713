//! Subcommands, one module each (`config` holds workloads, services and policies: the config
//! an agent holds).

pub mod config;
pub mod explain;
pub mod explain_service;
pub mod flows;
pub mod requests;
pub mod routes;
pub mod status;
pub mod table;
pub mod waypoint;
