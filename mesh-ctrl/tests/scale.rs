//! Control-plane scale, timed phase by phase (not a pass/fail test; run by hand):
//! `cargo test --release -p mesh-ctrl --test scale -- --ignored --nocapture`

use std::time::Instant;

use ferrymesh_testbed::mesh::scale_namespace_yaml;
use mesh_ctrl::snapshot::Publisher;
use mesh_ctrl::source::DirSource;

fn write_cluster(dir: &std::path::Path) {
    for ns in 0..100 {
        std::fs::write(dir.join(format!("scale-{ns:03}.yaml")), scale_namespace_yaml(ns, "n")).unwrap();
    }
}

#[test]
#[ignore = "measurement, run by hand"]
fn phases_at_10k_pods_and_2k_services() {
    let dir = tempfile::tempdir().unwrap();
    write_cluster(dir.path());
    let mut source = DirSource::new(dir.path());
    let (publisher, rx) = Publisher::new();
    for round in ["full load", "one pod changed"] {
        if round == "one pod changed" {
            let file = dir.path().join("scale-042.yaml");
            let text = std::fs::read_to_string(&file).unwrap();
            std::fs::write(&file, text.replacen("app: s0\n", "app: changed\n", 1)).unwrap();
        }
        let t = Instant::now();
        let (model, errors) = source.reload();
        let reload = t.elapsed();
        assert!(errors.is_empty());
        let t = Instant::now();
        let workloads = model.workloads();
        let workloads_time = t.elapsed();
        let t = Instant::now();
        let services = model.services_wire();
        let services_time = t.elapsed();
        let t = Instant::now();
        let before = rx.borrow().clone();
        publisher.publish(&model);
        let publish = t.elapsed();
        let t = Instant::now();
        let after = rx.borrow().clone();
        let mut update = ferrymesh_api::config::ConfigUpdate::default();
        ferrymesh_api::kinds::put_changes(&mut update, Some(&before.config.workloads), &after.config.workloads);
        let (up, rm) = (update.upserted, update.removed);
        let diff = t.elapsed();
        println!(
            "{round}: reload {reload:?}, workloads {workloads_time:?} ({}), services {services_time:?} ({}), publish {publish:?}, diff {diff:?} ({} upserted, {} removed)",
            workloads.len(), services.len(), up.len(), rm.len()
        );
    }
}
