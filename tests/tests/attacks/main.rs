//! Attack tests: each one is an attack on the mesh, run against the real binaries on the netns
//! topology (or through the Kubernetes API fake), judged by what the attacker and the victim
//! see: exit codes, bodies, the client address a server saw. One module per area; the table
//! in docs/SECURITY.md names, for each attack, where it is refused and which test proves it.
//! Needs root.

mod ctrl;
mod netns;
mod pool;
mod routes;
mod tls;
