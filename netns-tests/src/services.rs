//! Programs the tests run inside a namespace: an HTTP server (`python3 -m http.server`) and
//! `curl`, `ping`, iperf3 server and client.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::garbage;
use crate::process::{require_tool, Proc};
use crate::timing::{poll, wait_for};
use crate::topology::Ns;

/// The port test HTTP servers listen on.
pub const HTTP_PORT: u16 = 8080;
/// The port test iperf3 servers listen on.
pub const IPERF_PORT: u16 = 5201;

/// A running test HTTP server.
#[derive(Debug, Clone)]
pub struct HttpServer {
    pub proc: Proc,
    pub port: u16,
    /// URL path of the served file, e.g. `/a2a-alpha.txt`.
    pub path: String,
    /// Its exact content.
    pub body: String,
}

impl Ns {
    /// Starts `python3 -m http.server` on 0.0.0.0:`port` serving `dir` (not waiting for it).
    pub fn serve_dir(&self, label: &str, dir: &std::path::Path, port: u16) -> Proc {
        let dir = dir.to_string_lossy().into_owned();
        let port = port.to_string();
        self.spawn(
            label,
            &[
                "python3",
                "-m",
                "http.server",
                &port,
                "--bind",
                "0.0.0.0",
                "--directory",
                &dir,
            ],
        )
    }

    /// Starts `python3 -m http.server` on `HTTP_PORT`, serving one file with a unique body, and
    /// waits until it answers locally.
    pub fn serve_http(&self) -> HttpServer {
        let www = self.lab_dir().join(format!("{}-www", self.role));
        fs::create_dir_all(&www).expect("create www dir");
        let file = format!("a2a-{}.txt", self.role);
        let body = format!(
            "hello from {} in lab {} ({:016x})\n",
            self.role,
            self.lab_name(),
            garbage::Rng::new().next_u64()
        );
        fs::write(www.join(&file), &body).expect("write served file");
        let proc = self.serve_dir("http", &www, HTTP_PORT);
        let server = HttpServer {
            proc,
            port: HTTP_PORT,
            path: format!("/{file}"),
            body,
        };
        wait_for(
            Duration::from_secs(15),
            &format!("the HTTP server in {}", self.name),
            || {
                server.proc.assert_running();
                let body = self.http_get(Ipv4Addr::LOCALHOST, server.port, &server.path, 2)?;
                if body == server.body {
                    Ok(())
                } else {
                    Err(format!("unexpected body {body:?}"))
                }
            },
        );
        server
    }

    /// `curl`s `http://ip:port/path` from this namespace; the body on success.
    pub fn http_get(
        &self,
        ip: Ipv4Addr,
        port: u16,
        path: &str,
        timeout_s: u32,
    ) -> Result<String, String> {
        let url = format!("http://{ip}:{port}{path}");
        let t = timeout_s.to_string();
        let out = self.exec_timeout(
            &[
                "curl",
                "-sS",
                "--fail",
                "--noproxy",
                "*",
                "--connect-timeout",
                &t,
                "--max-time",
                &t,
                &url,
            ],
            Duration::from_secs(u64::from(timeout_s) + 5),
        );
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "curl {url} from {} failed ({:?}): {}",
                self.name,
                out.code,
                out.stderr.trim()
            ))
        }
    }

    /// `ping -c count` (0.2 s apart, 1 s wait for each reply); true if any reply came back.
    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        let c = count.to_string();
        let ip = ip.to_string();
        self.exec_timeout(
            &["ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1", &ip],
            Duration::from_secs(u64::from(count) + 10),
        )
        .success()
    }

    /// Starts `iperf3 -s` on `IPERF_PORT`.
    pub fn iperf3_server(&self) -> Proc {
        require_tool("iperf3", "iperf3");
        let port = IPERF_PORT.to_string();
        self.spawn("iperf3", &["iperf3", "-s", "-p", &port])
    }

    /// Runs an iperf3 TCP test of `secs` seconds towards `ip` (retrying until the server is
    /// up); returns the received throughput in Mbit/s.
    pub fn iperf3_client(&self, ip: impl Into<IpAddr>, secs: u32) -> Result<f64, String> {
        require_tool("iperf3", "iperf3");
        let port = IPERF_PORT.to_string();
        let ip = ip.into().to_string();
        let t = secs.to_string();
        poll(Duration::from_secs(15), || {
            let out = self.exec_timeout(
                &["iperf3", "-c", &ip, "-p", &port, "-t", &t, "-J"],
                Duration::from_secs(u64::from(secs) + 20),
            );
            let json: serde_json::Value = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("iperf3 printed no JSON ({e}): {out}"))?;
            if let Some(err) = json.get("error") {
                return Err(format!("iperf3: {err}"));
            }
            let end = &json["end"];
            end["sum_received"]["bits_per_second"]
                .as_f64()
                .or_else(|| end["sum"]["bits_per_second"].as_f64())
                .map(|bps| bps / 1e6)
                .ok_or_else(|| format!("iperf3 JSON without a throughput: {out}"))
        })
    }
}
