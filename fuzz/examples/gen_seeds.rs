//! Writes every target's seeds to `corpus/<target>/`: `cargo run --example gen_seeds` (in fuzz/).
//! The targets are the files in `fuzz_targets/`.

use std::fs;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut targets: Vec<String> = fs::read_dir(root.join("fuzz_targets"))
        .expect("fuzz_targets/")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".rs")?.to_string())
        })
        .collect();
    targets.sort();
    for target in targets {
        let seeds = a2a_fuzz::seeds::for_target(&target);
        let dir = root.join("corpus").join(&target);
        fs::create_dir_all(&dir).expect("corpus directory");
        for (name, bytes) in &seeds {
            fs::write(dir.join(name), bytes).expect("seed file");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
