//! Compiles l4lb's XDP steering program (bpf/l4lb_steer.c) with clang into
//! `$OUT_DIR/l4lb_steer.o`, which the binary embeds and loads at start-up.
//!
//! The BPF headers (`bpf/bpf_helpers.h`) come from the libbpf-sys crate's
//! build (`DEP_BPF_INCLUDE`, since it declares `links = "bpf"`), falling back
//! to the system's; `asm/types.h` needs the multiarch include directory.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/l4lb_steer.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("l4lb_steer.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64",
        Ok("aarch64") => "aarch64",
        Ok(other) => other,
        Err(_) => "x86_64",
    }
    .to_string();

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"));
    if let Some(inc) = env::var_os("DEP_BPF_INCLUDE") {
        cmd.arg("-I").arg(inc);
    }
    cmd.args(["-c", src, "-o"]).arg(&obj);

    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot run `{clang}` to build the XDP program ({e}); \
             install clang and llvm (scripts/install-deps.sh does)"
        ),
    };
    if !status.success() {
        panic!("`{clang}` failed to compile {src} (see the errors above)");
    }

    // The end-to-end benchmark's traffic generator and backend sink
    // (bench/e2e.rs embeds them), compiled the same way.
    for name in ["bench_gen", "bench_sink"] {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I/usr/include/{arch}-linux-gnu"));
        if let Some(inc) = env::var_os("DEP_BPF_INCLUDE") {
            cmd.arg("-I").arg(inc);
        }
        cmd.args(["-c", &src, "-o"]).arg(&obj);
        let status = match cmd.status() {
            Ok(s) => s,
            Err(e) => panic!("cannot run `{clang}` to build {src} ({e})"),
        };
        if !status.success() {
            panic!("`{clang}` failed to compile {src} (see the errors above)");
        }
    }
}
