//! The fuzz targets' corpora (`fuzz/corpus/<target>/`, grown by cargo-fuzz; docs/FUZZING.md)
//! replayed through the same decoders on the stable toolchain: every input the fuzzers kept,
//! crashes they found and fixed included, stays a regression test.

use std::path::Path;

#[test]
fn every_corpus_input_decodes_without_a_panic() {
    let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let targets = meshgram_node::fuzzing::TARGETS
        .iter()
        .chain(&meshgram_relay::fuzzing::TARGETS)
        .chain(&meshgram_bot_bridge::fuzzing::TARGETS);
    for (name, decode) in targets {
        let dir = corpora.join(name);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (each target's corpus is committed)", dir.display()))
            .map(|entry| entry.expect("a corpus entry").path())
            .collect();
        assert!(!inputs.is_empty(), "{} is empty", dir.display());
        for input in inputs {
            let bytes = std::fs::read(&input).expect("a corpus file");
            decode(&bytes);
        }
        eprintln!("{name}: replayed {} inputs", std::fs::read_dir(&dir).map_or(0, Iterator::count));
    }
}
