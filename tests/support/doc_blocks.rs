//! The fenced code blocks of the README and the guides, for the tests that run them:
//! shared by the daemon tests (which run most blocks) and the deployment tests (which run
//! the container blocks under podman), so both read a block exactly as a user sees it.
//!
//! Every block says in its info string whether a test runs it: ```` ```sh runnable:NAME ````
//! (a test takes it by name and runs it), or ```` ```sh norun:REASON ```` with a reason from
//! the fixed list of `tests/daemon/docs.rs` (GitHub shows the first word as the language
//! and ignores the rest).

use std::path::{Path, PathBuf};

/// The files a user reads: README.md and every Markdown file under docs/.
pub fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut guides: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    files.extend(guides);
    files
}

/// A fenced code block of a documentation file.
#[derive(Debug)]
pub struct Block {
    pub file: PathBuf,
    /// Its line (1-based) of the opening fence.
    pub line: usize,
    /// `runnable:NAME`: the name.
    pub runnable: Option<String>,
    /// `norun:REASON`: the reason.
    pub norun: Option<String>,
    pub text: String,
}

/// Every fenced block of `text`.
pub fn blocks_in(file: &Path, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (open.take(), fence) {
            (None, Some(info)) => {
                let word = |prefix: &str| {
                    info.split_whitespace()
                        .find_map(|w| w.strip_prefix(prefix))
                        .map(str::to_string)
                };
                open = Some(Block {
                    file: file.to_path_buf(),
                    line: i + 1,
                    runnable: word("runnable:"),
                    norun: word("norun:"),
                    text: String::new(),
                });
            }
            (Some(block), Some(_)) => blocks.push(block),
            (Some(mut block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    blocks
}

/// Every fenced block of the README and the guides.
pub fn all_blocks() -> Vec<Block> {
    doc_files()
        .into_iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(&file).expect("a doc file");
            blocks_in(&file, &text)
        })
        .collect()
}

/// The text of the one block marked `runnable:NAME`.
pub fn runnable(name: &str) -> String {
    let mut found: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.runnable.as_deref() == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "runnable:{name} blocks: {found:?}");
    found.remove(0).text
}

/// A `console` block as (command, the output lines shown under it): each `$ ` line is a
/// command, the lines up to the next one its output.
pub fn transcript(block: &str) -> Vec<(String, Vec<String>)> {
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines() {
        if let Some(command) = line.strip_prefix("$ ") {
            steps.push((command.to_string(), Vec::new()));
        } else if let Some((_, output)) = steps.last_mut() {
            output.push(line.to_string());
        } else {
            panic!("a console block starts with output, not a `$ ` command: {line:?}");
        }
    }
    steps
}
