//! Files the .deb ships that are generated from the clap definition, so they can never drift
//! from what `a2actl` accepts: the man page and the bash, zsh and fish completions.
//! `packaging/build-deb` runs the hidden `a2actl generate-assets DIR`, which is added to the
//! parser only, not to `Cli`, so that it appears in none of the files it writes (clap_complete
//! lists hidden subcommands too).

use std::fs;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

const GENERATOR: &str = "generate-assets";

/// `cmd` with the hidden `generate-assets DIR` subcommand.
pub fn with_generator(cmd: clap::Command) -> clap::Command {
    cmd.subcommand(
        clap::Command::new(GENERATOR)
            .hide(true)
            .about("Write the man pages and shell completions into DIR")
            .arg(
                clap::Arg::new("dir")
                    .value_name("DIR")
                    .required(true)
                    .value_parser(clap::value_parser!(PathBuf)),
            ),
    )
}

/// The DIR of `generate-assets DIR`, when that is the subcommand given.
pub fn generator_dir(matches: &clap::ArgMatches) -> Option<PathBuf> {
    matches
        .subcommand_matches(GENERATOR)
        .and_then(|m| m.get_one::<PathBuf>("dir").cloned())
}

/// Writes `DIR/man/a2actl.1` (and `a2actl-SUBCOMMAND.1`) and `DIR/completions/{a2actl.bash,_a2actl,a2actl.fish}`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> Result<(), String> {
    let name = cmd.get_name().to_string();
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man_dir, &completions] {
        fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }

    // a2actl.1 and a page per subcommand (a2actl-up.1, …), which a2actl.1 refers to.
    clap_mangen::generate_to(cmd.clone(), &man_dir)
        .map_err(|e| format!("cannot write man pages into {}: {e}", man_dir.display()))?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, &name, &completions)
            .map_err(|e| format!("cannot write {shell} completions: {e}"))?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("wrote {}", man_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn generates_man_page_and_completions_without_the_hidden_command() {
        let dir = std::env::temp_dir().join(format!("a2actl-assets-{}", std::process::id()));
        super::generate(<crate::Cli as clap::CommandFactory>::command(), &dir).unwrap();
        let man = std::fs::read_to_string(dir.join("man/a2actl.1")).unwrap();
        assert!(man.contains("a2actl\\-status(1)"), "{man}");
        assert!(!man.contains("generate\\-assets"), "{man}");
        assert!(!man.contains("generate-assets"), "{man}");
        for page in [
            "a2actl-up.1",
            "a2actl-down.1",
            "a2actl-status.1",
            "a2actl-ip.1",
        ] {
            assert!(dir.join("man").join(page).exists(), "{page}");
        }
        assert!(!dir.join("man/a2actl-generate-assets.1").exists());
        for f in ["a2actl.bash", "_a2actl", "a2actl.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(f)).unwrap();
            assert!(text.contains("status"), "{f}");
            assert!(!text.contains("generate-assets"), "{f}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod parse_tests {
    use clap::CommandFactory;

    #[test]
    fn hidden_generator_parses_and_leaves_the_cli_alone() {
        let cmd = super::with_generator(crate::Cli::command());
        let m = cmd
            .clone()
            .try_get_matches_from(["a2actl", "generate-assets", "/tmp/x"])
            .unwrap();
        assert_eq!(super::generator_dir(&m), Some("/tmp/x".into()));
        let m = cmd.try_get_matches_from(["a2actl", "ip"]).unwrap();
        assert_eq!(super::generator_dir(&m), None);
        assert!(crate::Cli::command()
            .get_subcommands()
            .all(|s| s.get_name() != super::GENERATOR));
    }
}
