//! Generates the DPDK bindings and builds the C shim, only with the `link`
//! feature (the workspace's `dpdk` feature turns it on).
//!
//! DPDK is found with pkg-config (`libdpdk` >= 22.11). Its full `--cflags`
//! (including `-include rte_config.h` and `-march=...`) go to bindgen and to
//! the C compiler alike: a mismatch breaks inlining of the vector paths. The
//! pkg-config crate keeps only `-I`/`-D`, so pkg-config is run directly. DPDK
//! is linked dynamically, so its driver plugins load at EAL start.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/shim.c");
    #[cfg(feature = "link")]
    link::generate();
}

#[cfg(feature = "link")]
mod link {
    use std::path::PathBuf;
    use std::process::Command;

    fn pkg_config(args: &[&str]) -> String {
        let out = Command::new("pkg-config")
            .args(args)
            .arg("libdpdk")
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Ok(o) => fail(&format!(
                "pkg-config {args:?} libdpdk failed: {} (install libdpdk-dev >= 22.11)",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => fail(&format!("cannot run pkg-config: {e} (install pkg-config)")),
        }
    }

    fn fail(msg: &str) -> ! {
        println!("cargo:warning=dpdk-sys: {msg}");
        std::process::exit(1);
    }

    /// Splits flags, keeping `-include FILE` as one unit.
    fn flags(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut it = s.split_whitespace();
        while let Some(f) = it.next() {
            if f == "-include" {
                if let Some(file) = it.next() {
                    out.push(f.to_string());
                    out.push(file.to_string());
                }
            } else {
                out.push(f.to_string());
            }
        }
        out
    }

    pub fn generate() {
        let version = pkg_config(&["--modversion"]);
        let atleast = Command::new("pkg-config")
            .args(["--atleast-version=22.11", "libdpdk"])
            .status()
            .is_ok_and(|s| s.success());
        if !atleast {
            fail(&format!("libdpdk {version} is older than 22.11"));
        }
        let cflags = flags(&pkg_config(&["--cflags"]));
        let libs = pkg_config(&["--libs"]);
        for l in libs.split_whitespace() {
            if let Some(dir) = l.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={dir}");
            } else if let Some(lib) = l.strip_prefix("-l") {
                println!("cargo:rustc-link-lib=dylib={lib}");
            } else if l.starts_with("-Wl,") {
                println!("cargo:rustc-link-arg={l}");
            }
        }
        // The vhost PMD's own API (which queues a guest enabled) is in its
        // driver library, which libdpdk's pkg-config does not list. It is
        // the same file EAL loads as a plugin, so it is loaded once.
        println!("cargo:rustc-link-lib=dylib=rte_net_vhost");
        let mut cc = cc::Build::new();
        cc.file("shim/shim.c").include("shim").warnings(true);
        let mut it = cflags.iter();
        while let Some(f) = it.next() {
            if f == "-include" {
                if let Some(file) = it.next() {
                    cc.flag("-include").flag(file);
                }
            } else {
                cc.flag(f);
            }
        }
        cc.compile("pollux_dpdk_shim");

        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
        let bindings = bindgen::Builder::default()
            .header("shim/shim.h")
            .clang_args(&cflags)
            .allowlist_function("rte_.*")
            .allowlist_function("pollux_.*")
            .allowlist_type("rte_.*")
            .allowlist_var("RTE_.*")
            // Packed structs that hold aligned members do not compile in
            // Rust (E0588); pollux parses these headers itself.
            .opaque_type("rte_l2tpv2_.*")
            .opaque_type("rte_gtp_.*")
            .opaque_type("rte_arp_.*")
            .opaque_type("rte_.*_hdr")
            .generate_comments(false)
            .layout_tests(false)
            .derive_default(true)
            .prepend_enum_name(false)
            .generate();
        let bindings = match bindings {
            Ok(b) => b,
            Err(e) => fail(&format!("bindgen failed on DPDK {version}: {e}")),
        };
        if let Err(e) = bindings.write_to_file(out.join("bindings.rs")) {
            fail(&format!("cannot write the bindings: {e}"));
        }
    }
}
