//! The config stream as the agent and the waypoint take it: any bytes decoded as a
//! `ConfigUpdate`, every object converted (each kind's `TryFrom`), and applied on top of a
//! realistic mesh. An update is applied whole or not at all: one that is refused leaves the
//! state exactly as it was. The trust bundle it may carry is parsed as the client parses it.
#![no_main]

use ferrymesh_api::config as proto;
use ferrymesh_dataplane::state::State;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = proto::ConfigUpdate::decode(data) else { return };
    let state = State::default();
    state.apply(ferrymesh_fuzz::mesh()).expect("the base mesh applies");
    let before = state.dump();
    let version = state.ctrl_status().1;
    let roots = update.trust_roots_pem.clone();
    let issuer = update.issuer_sha256.clone();
    match state.apply(update) {
        Ok(()) => {
            // What is held converts back and applies again as a snapshot.
            let again = State::default();
            again.apply(state.dump().to_snapshot()).expect("a held config applies as a snapshot");
            assert_eq!(again.dump(), state.dump());
        }
        Err(_) => {
            assert_eq!(state.dump(), before, "a refused update changed nothing");
            assert_eq!(state.ctrl_status().1, version);
        }
    }
    if let Ok(certs) = ferrymesh_dataplane::trust::certificates(&roots) {
        let _ = ferrymesh_dataplane::trust::TrustBundle::from_certs(certs, &issuer);
    }
});
