//! A plain HTTP/1.1 client over `TcpStream` for the integration tests: one
//! request per connection, and line-by-line reading of watch streams.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

pub mod kubectl;

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// Reads the status line and headers; returns the code and whether the body
/// is chunked (else its length).
fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((code, headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Reads one chunk of a chunked body; `None` at the end.
fn read_chunk(r: &mut impl BufRead) -> Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let size =
        usize::from_str_radix(line.trim(), 16).with_context(|| format!("chunk size {line:?}"))?;
    let mut data = vec![0; size];
    r.read_exact(&mut data)?;
    line.clear();
    r.read_line(&mut line)?;
    Ok((size > 0).then_some(data))
}

/// A response: code, headers and body text.
pub struct Resp {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
    accept: &str,
) -> Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let (code, headers) = read_head(&mut r)?;
    let mut body = Vec::new();
    if header(&headers, "transfer-encoding") == Some("chunked") {
        while let Some(c) = read_chunk(&mut r)? {
            body.extend(c);
        }
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Resp {
        code,
        headers,
        body: String::from_utf8(body)?,
    })
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<Resp> {
    request_with(addr, method, path, content_type, body, "application/json")
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Resp> {
    request(addr, "GET", path, "application/json", "")
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Result<Resp> {
    request(addr, "POST", path, "application/json", &body.to_string())
}

/// A pod with one container.
pub fn pod(name: &str, labels: &Value) -> Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    })
}

/// Creates a pod in `default` and returns its resourceVersion.
pub fn create_pod(addr: SocketAddr, name: &str, labels: &Value) -> Result<u64> {
    let r = post(addr, "/api/v1/namespaces/default/pods", &pod(name, labels))?;
    if r.code != 201 {
        bail!("creating {name}: {} {}", r.code, r.body);
    }
    Ok(r.json()?["metadata"]["resourceVersion"]
        .as_str()
        .context("no resourceVersion")?
        .parse()?)
}

/// An open watch: events arrive one JSON line at a time.
pub struct Watch {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
    pub code: u16,
}

impl Watch {
    pub fn open(addr: SocketAddr, path: &str) -> Result<Self> {
        let s = send(addr, "GET", path, "application/json", "")?;
        let mut reader = BufReader::new(s);
        let (code, headers) = read_head(&mut reader)?;
        if code == 200 && header(&headers, "transfer-encoding") != Some("chunked") {
            bail!("a watch must stream a chunked body; headers {headers:?}");
        }
        Ok(Self {
            reader,
            pending: Vec::new(),
            code,
        })
    }

    /// The next event, or `None` once the server ends the stream. Fails if
    /// nothing arrives within `timeout`.
    pub fn next_within(&mut self, timeout: Duration) -> Result<Option<Value>> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            match read_chunk(&mut self.reader).context("waiting for a watch event")? {
                Some(data) => self.pending.extend(data),
                None => return Ok(None),
            }
        }
    }

    pub fn next(&mut self) -> Result<Value> {
        self.next_within(Duration::from_secs(5))?
            .context("the watch ended")
    }

    /// Asserts no event arrives within `d`.
    pub fn expect_quiet(&mut self, d: Duration) -> Result<()> {
        let start = Instant::now();
        match self.next_within(d) {
            Ok(Some(ev)) => bail!("unexpected event after {:?}: {ev}", start.elapsed()),
            Ok(None) => bail!("the watch ended"),
            Err(_) => Ok(()),
        }
    }
}

/// `type` and `metadata.name` of a watch event.
pub fn summary(ev: &Value) -> (String, String) {
    (
        ev["type"].as_str().unwrap_or_default().to_string(),
        ev["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

pub fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
