//! UPnP IGD codecs for the port mapper: the SSDP search (UDP multicast to
//! 239.255.255.250:1900) and its answer, the device description's WANIPConnection control URL,
//! and the SOAP calls GetExternalIPAddress, AddPortMapping and DeletePortMapping over HTTP/1.1.
//! Only the gateway is believed: an answer that points anywhere else is refused. Nothing here
//! does I/O; the driver bounds what it reads ([`MAX_HTTP`]) and how long it waits.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Where SSDP searches go.
pub const SSDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// The most bytes read of one HTTP answer (a description is a few KiB).
pub const MAX_HTTP: usize = 64 * 1024;
/// The description (and lease) of the mappings a2a makes.
const DESCRIPTION: &str = "a2a";

/// An `http://` URL on the gateway: its address and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub addr: SocketAddrV4,
    pub path: String,
}

/// The WANIPConnection (or WANPPPConnection) service of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub control: Url,
    /// `urn:schemas-upnp-org:service:WANIPConnection:1` (or `:2`, or PPP).
    pub service_type: String,
}

/// The SSDP M-SEARCH for an Internet gateway device.
pub fn search() -> Vec<u8> {
    b"M-SEARCH * HTTP/1.1\r\n\
      HOST: 239.255.255.250:1900\r\n\
      MAN: \"ssdp:discover\"\r\n\
      MX: 1\r\n\
      ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
        .to_vec()
}

/// Parses `http://a.b.c.d[:port]/path`; only an IPv4 literal host, which must be `gateway`.
pub fn parse_url(url: &str, gateway: Ipv4Addr) -> Option<Url> {
    let rest = url.trim().strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (hostport, 80),
    };
    let ip: Ipv4Addr = host.parse().ok()?;
    if ip != gateway || port == 0 || path.len() > 512 {
        return None;
    }
    Some(Url {
        addr: SocketAddrV4::new(ip, port),
        path: path.to_string(),
    })
}

/// The header `name` (case-insensitive) of an HTTP message's head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The description URL from an SSDP answer, if it is a `200` naming an IGD on the gateway.
pub fn parse_search_answer(data: &[u8], gateway: Ipv4Addr) -> Option<Url> {
    let text = std::str::from_utf8(data).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    let status = head.lines().next()?;
    if !status.starts_with("HTTP/1.") || status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    parse_url(header(head, "location")?, gateway)
}

/// A GET of `url` (its description).
pub fn get(url: &Url) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.path, url.addr
    )
    .into_bytes()
}

/// An HTTP answer: its status code and body (`None`: not HTTP or cut short).
pub fn parse_http(data: &[u8]) -> Option<(u16, &str)> {
    let text = std::str::from_utf8(data).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    if !status.starts_with("HTTP/1.") {
        return None;
    }
    let code = status.split_whitespace().nth(1)?.parse().ok()?;
    if let Some(len) = header(head, "content-length").and_then(|l| l.parse::<usize>().ok()) {
        if body.len() < len {
            return None;
        }
        return Some((code, body.get(..len)?));
    }
    Some((code, body))
}

/// The text of the first `<tag>…</tag>` in `xml` (any namespace prefix).
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find('<') {
        let start = from + i + 1;
        let end = start + xml[start..].find('>')?;
        let name = &xml[start..end];
        let local = name.rsplit(':').next().unwrap_or(name);
        if local == tag {
            let body = &xml[end + 1..];
            let close = body.find("</")?;
            return Some(body[..close].trim());
        }
        from = end;
    }
    None
}

/// The gateway's WAN connection service from its description.
pub fn parse_description(xml: &str, gateway: Ipv4Addr, base: &Url) -> Option<Service> {
    for block in xml.split("<service>").skip(1) {
        let block = block.split("</service>").next()?;
        let Some(st) = element(block, "serviceType") else {
            continue;
        };
        if !(st.starts_with("urn:schemas-upnp-org:service:WANIPConnection:")
            || st.starts_with("urn:schemas-upnp-org:service:WANPPPConnection:"))
        {
            continue;
        }
        let control = element(block, "controlURL")?;
        let control = if control.starts_with('/') {
            Url {
                addr: base.addr,
                path: control.to_string(),
            }
        } else {
            parse_url(control, gateway)?
        };
        if st.len() > 128 || st.contains(['"', '<', '>']) {
            return None;
        }
        return Some(Service {
            control,
            service_type: st.to_string(),
        });
    }
    None
}

fn soap(service: &Service, action: &str, args: &[(&str, String)]) -> Vec<u8> {
    let args: String = args
        .iter()
        .map(|(k, v)| format!("<{k}>{v}</{k}>"))
        .collect();
    let body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{st}\">{args}</u:{action}></s:Body></s:Envelope>\r\n",
        st = service.service_type
    );
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{st}#{action}\"\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
        path = service.control.path,
        addr = service.control.addr,
        st = service.service_type,
        len = body.len(),
    )
    .into_bytes()
}

pub fn get_external_ip(service: &Service) -> Vec<u8> {
    soap(service, "GetExternalIPAddress", &[])
}

/// AddPortMapping of UDP `external` to `client:internal` for `lease` seconds.
pub fn add_port_mapping(
    service: &Service,
    external: u16,
    client: Ipv4Addr,
    internal: u16,
    lease: u32,
) -> Vec<u8> {
    soap(
        service,
        "AddPortMapping",
        &[
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external.to_string()),
            ("NewProtocol", "UDP".into()),
            ("NewInternalPort", internal.to_string()),
            ("NewInternalClient", client.to_string()),
            ("NewEnabled", "1".into()),
            ("NewPortMappingDescription", DESCRIPTION.into()),
            ("NewLeaseDuration", lease.to_string()),
        ],
    )
}

pub fn delete_port_mapping(service: &Service, external: u16) -> Vec<u8> {
    soap(
        service,
        "DeletePortMapping",
        &[
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external.to_string()),
            ("NewProtocol", "UDP".into()),
        ],
    )
}

/// A SOAP answer: `Ok(body)` for 200, `Err(UPnP error code, 0 if none)` for a fault.
pub fn parse_soap(data: &[u8]) -> Option<Result<&str, u32>> {
    let (code, body) = parse_http(data)?;
    if code == 200 {
        return Some(Ok(body));
    }
    Some(Err(element(body, "errorCode")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)))
}

/// The address in a GetExternalIPAddress answer.
pub fn parse_external_ip(body: &str) -> Option<Ipv4Addr> {
    element(body, "NewExternalIPAddress")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 4, 1);

    #[test]
    fn an_ssdp_answer_names_the_description_on_the_gateway_only() {
        let answer = b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n\
            ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
            Location: http://192.168.4.1:33337/rootDesc.xml\r\n\r\n";
        assert_eq!(
            parse_search_answer(answer, GW),
            Some(Url {
                addr: "192.168.4.1:33337".parse().unwrap(),
                path: "/rootDesc.xml".into()
            })
        );
        let elsewhere = b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.4.66:80/x.xml\r\n\r\n";
        assert_eq!(parse_search_answer(elsewhere, GW), None);
        let by_name = b"HTTP/1.1 200 OK\r\nLOCATION: http://router.local/x.xml\r\n\r\n";
        assert_eq!(parse_search_answer(by_name, GW), None);
        for junk in [
            &b""[..],
            b"\xff\xfe",
            b"HTTP/1.1 404 Not Found\r\nLOCATION: http://192.168.4.1:1/\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(parse_search_answer(junk, GW), None, "{junk:?}");
        }
    }

    #[test]
    fn the_description_gives_the_wan_connection_control_url() {
        let base = parse_url("http://192.168.4.1:5000/rootDesc.xml", GW).unwrap();
        let xml = "<root><device><serviceList>\
            <service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>\
            <controlURL>/ctl/L3F</controlURL></service>\
            <service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>\
            <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>\
            <controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>";
        let s = parse_description(xml, GW, &base).unwrap();
        assert_eq!(s.control.path, "/ctl/IPConn");
        assert_eq!(s.control.addr, base.addr);
        assert_eq!(
            s.service_type,
            "urn:schemas-upnp-org:service:WANIPConnection:2"
        );
        let absolute = xml.replace("/ctl/IPConn", "http://192.168.4.1:6000/ipc");
        assert_eq!(
            parse_description(&absolute, GW, &base)
                .unwrap()
                .control
                .addr,
            "192.168.4.1:6000".parse().unwrap()
        );
        let foreign = xml.replace("/ctl/IPConn", "http://10.0.0.9:6000/ipc");
        assert_eq!(parse_description(&foreign, GW, &base), None);
        assert_eq!(parse_description("<garbage", GW, &base), None);
        assert_eq!(parse_description("<service><serviceType>", GW, &base), None);
    }

    #[test]
    fn soap_calls_and_answers() {
        let service = Service {
            control: parse_url("http://192.168.4.1:5000/ctl/IPConn", GW).unwrap(),
            service_type: "urn:schemas-upnp-org:service:WANIPConnection:1".into(),
        };
        let req = String::from_utf8(add_port_mapping(
            &service,
            51820,
            Ipv4Addr::new(192, 168, 4, 2),
            51820,
            7200,
        ))
        .unwrap();
        assert!(req.starts_with("POST /ctl/IPConn HTTP/1.1\r\n"));
        assert!(req.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\""
        ));
        let (_, body) = req.split_once("\r\n\r\n").unwrap();
        assert!(req.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(body.contains("<NewInternalClient>192.168.4.2</NewInternalClient>"));
        let ok = b"HTTP/1.1 200 OK\r\n\r\n<s:Envelope><s:Body><u:GetExternalIPAddressResponse><NewExternalIPAddress>44.1.0.3</NewExternalIPAddress>";
        let (_, body) = parse_http(ok).unwrap();
        assert_eq!(parse_external_ip(body), Some(Ipv4Addr::new(44, 1, 0, 3)));
        let fault = b"HTTP/1.1 500 Internal Server Error\r\n\r\n<s:Fault><detail><UPnPError><errorCode>718</errorCode></UPnPError></detail></s:Fault>";
        assert_eq!(parse_soap(fault), Some(Err(718)));
        assert_eq!(parse_soap(b"garbage"), None);
        // Cut short of its Content-Length.
        assert_eq!(
            parse_http(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
            None
        );
        assert_eq!(
            parse_external_ip("<NewExternalIPAddress>x</NewExternalIPAddress>"),
            None
        );
    }
}
