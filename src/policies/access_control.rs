//! `AccessControl` (Apigee's policy of that name): allow or deny a request by the client's
//! IP address, with IPv4 and IPv6 CIDR rules evaluated in order.
//!
//! ```yaml
//! spec:
//!   type: AccessControl
//!   noRuleMatchAction: ALLOW          # ALLOW (default) | DENY: when no rule matches
//!   validateBasedOn: X_FORWARDED_FOR_ALL_IP   # (default) | X_FORWARDED_FOR_FIRST_IP
//!                                             # | X_FORWARDED_FOR_LAST_IP | CLIENT_IP
//!   matchRules:
//!   - action: DENY
//!     sourceAddresses: [10.10.20.0/24, 198.51.100.7, "2001:db8::/32"]
//!   - action: ALLOW
//!     sourceAddresses: [10.0.0.0/8]
//! ```
//!
//! Apigee's `<MatchRule action><SourceAddress mask="24">10.10.20.0</SourceAddress>` is a
//! `sourceAddresses` entry `10.10.20.0/24` (no mask: the whole address). The first rule with
//! an address that contains the client's decides; otherwise `noRuleMatchAction`. A denial is
//! 403 `accesscontrol.IPDeniedAccess`, `Access Denied for client ip : <ip>`, as Apigee's.
//!
//! Which addresses are checked (`validateBasedOn`):
//! - `X_FORWARDED_FOR_ALL_IP` (Apigee's default): every `X-Forwarded-For` entry *and* the
//!   client address tollgate trusts (`client.ip`: Envoy's `source.address`, or the entry
//!   `--xff-trusted-hops` names); each must be allowed. The client can add entries to the
//!   header but never remove its real address, so it cannot talk its way past a rule.
//! - `X_FORWARDED_FOR_FIRST_IP`: the first entry. **The client writes it** unless a proxy in
//!   front overwrites the header: use it only behind one that does (as in Apigee).
//! - `X_FORWARDED_FOR_LAST_IP`: the last entry (the address the nearest proxy saw; Envoy
//!   appends it with `use_remote_address: true`, writing its own host address instead when
//!   the peer is a loopback address).
//! - `CLIENT_IP` (tollgate's): `client.ip` only.
//!
//! Without `X-Forwarded-For`, every mode checks `client.ip`. A request whose address cannot
//! be known (no `source.address` attribute, an entry that is not an IP address) is denied:
//! the policy cannot say it is allowed. Apigee's templated `SourceAddress` values are not
//! supported (refused at load).

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;

use super::{parse_spec, BuildContext, SpecError};
use crate::fault::Fault;
use crate::pipeline::{Direction, Hook, Outcome, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "AccessControl";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    no_rule_match_action: Option<String>,
    #[serde(default)]
    validate_based_on: Option<String>,
    #[serde(default)]
    match_rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleSpec {
    action: String,
    source_addresses: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Basis {
    AllIps,
    FirstIp,
    LastIp,
    ClientIp,
}

/// An address block: the network's bits and the prefix length, IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: the mask is 0 to {max}"))?,
            None => max,
        };
        Ok(Self { net, len })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen as an IPv4-mapped IPv6 address is the IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
struct AccessControl {
    rules: Vec<(Action, Vec<Cidr>)>,
    otherwise: Action,
    basis: Basis,
}

fn action(s: &str, field: &str) -> Result<Action, SpecError> {
    match s.to_ascii_uppercase().as_str() {
        "ALLOW" => Ok(Action::Allow),
        "DENY" => Ok(Action::Deny),
        _ => Err(SpecError::new(field, format!("`{s}`: ALLOW or DENY"))),
    }
}

pub fn build(_ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let otherwise = match &spec.no_rule_match_action {
        Some(a) => action(a, "noRuleMatchAction")?,
        None => Action::Allow,
    };
    let basis = match spec
        .validate_based_on
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("X_FORWARDED_FOR_ALL_IP") => Basis::AllIps,
        Some("X_FORWARDED_FOR_FIRST_IP") => Basis::FirstIp,
        Some("X_FORWARDED_FOR_LAST_IP") => Basis::LastIp,
        Some("CLIENT_IP") => Basis::ClientIp,
        Some(other) => {
            return Err(SpecError::new(
                "validateBasedOn",
                format!(
                    "`{other}`: X_FORWARDED_FOR_ALL_IP, X_FORWARDED_FOR_FIRST_IP, \
                     X_FORWARDED_FOR_LAST_IP or CLIENT_IP"
                ),
            ))
        }
    };
    let rules = spec
        .match_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("matchRules[{i}]");
            let act = action(&r.action, &format!("{at}.action"))?;
            if r.source_addresses.is_empty() {
                return Err(SpecError::new(
                    format!("{at}.sourceAddresses"),
                    "give one or more addresses",
                ));
            }
            let blocks = r
                .source_addresses
                .iter()
                .enumerate()
                .map(|(j, a)| {
                    let field = format!("{at}.sourceAddresses[{j}]");
                    if a.contains('{') {
                        return Err(SpecError::new(
                            field,
                            "templated addresses are not supported: give literal addresses",
                        ));
                    }
                    Cidr::parse(a).map_err(|m| SpecError::new(field, m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((act, blocks))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if basis == Basis::FirstIp {
        tracing::warn!(
            "AccessControl X_FORWARDED_FOR_FIRST_IP decides on an address the client writes \
             unless a proxy in front overwrites X-Forwarded-For"
        );
    }
    if rules.is_empty() && otherwise == Action::Allow {
        return Err(SpecError::new(
            "matchRules",
            "no rules and noRuleMatchAction ALLOW: the policy would allow everything",
        ));
    }
    Ok(Arc::new(AccessControl {
        rules,
        otherwise,
        basis,
    }))
}

impl AccessControl {
    fn decide(&self, ip: IpAddr) -> Action {
        self.rules
            .iter()
            .find(|(_, blocks)| blocks.iter().any(|b| b.contains(ip)))
            .map(|(a, _)| *a)
            .unwrap_or(self.otherwise)
    }

    /// The addresses to check, as text; empty when none is known.
    fn addresses<'e>(&self, ex: &'e Exchange) -> Vec<&'e str> {
        let xff: Vec<&str> = ex
            .request
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let client = ex.client_ip();
        if xff.is_empty() || self.basis == Basis::ClientIp {
            return client.into_iter().collect();
        }
        match self.basis {
            Basis::FirstIp => xff[..1].to_vec(),
            Basis::LastIp => xff[xff.len() - 1..].to_vec(),
            Basis::AllIps | Basis::ClientIp => {
                let mut all = xff;
                all.extend(client);
                all
            }
        }
    }
}

fn denied(ip: &str) -> Fault {
    Fault::new(
        403,
        "accesscontrol.IPDeniedAccess",
        format!("Access Denied for client ip : {ip}"),
    )
}

/// An `X-Forwarded-For` entry as an address: a bare address, or one with a port
/// (`1.2.3.4:5`, `[2001:db8::1]:5`), as some proxies write them.
fn parse_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

impl Policy for AccessControl {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, _dir: Direction) -> Hook<'a> {
        let addresses = self.addresses(ex);
        if addresses.is_empty() {
            return Hook::Ready(Outcome::Reject(denied("unknown")));
        }
        for a in addresses {
            let allowed = parse_entry(a).is_some_and(|ip| self.decide(ip) == Action::Allow);
            if !allowed {
                return Hook::Ready(Outcome::Reject(denied(a)));
            }
        }
        Hook::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo};

    fn build_y(y: &str) -> Result<Arc<dyn Policy>, SpecError> {
        build(&BuildContext::default(), serde_norway::from_str(y).unwrap())
    }

    fn ex(source: Option<&str>, xff: &[&str]) -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "GET".into());
        h.push(":path".into(), "/".into());
        for x in xff {
            h.push("x-forwarded-for".into(), (*x).into());
        }
        let mut ex = Exchange {
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        if let Some(s) = source {
            ex.attributes.insert("source.address".into(), s.into());
        }
        ex
    }

    fn outcome(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Result<(), (u16, String, String)> {
        match p.run(ex, Direction::Request) {
            Hook::Ready(Outcome::Continue) => Ok(()),
            Hook::Ready(Outcome::Reject(f)) => Err((f.status, f.code, f.message)),
            _ => panic!("unexpected outcome"),
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.10.20.0/24").unwrap();
        assert!(c.contains("10.10.20.255".parse().unwrap()));
        assert!(!c.contains("10.10.21.0".parse().unwrap()));
        assert!(c.contains("::ffff:10.10.20.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(!Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/33").is_err());
        assert!(Cidr::parse("1.2.3/8").is_err());
        assert!(Cidr::parse("::/129").is_err());
        assert!(Cidr::parse("::/0").is_ok());
    }

    #[test]
    fn first_matching_rule_decides() {
        let p = build_y(
            r#"
noRuleMatchAction: DENY
validateBasedOn: CLIENT_IP
matchRules:
- {action: DENY, sourceAddresses: [10.1.2.0/24]}
- {action: allow, sourceAddresses: [10.0.0.0/8, "2001:db8::/32"]}
"#,
        )
        .unwrap();
        assert_eq!(outcome(&p, &mut ex(Some("10.9.9.9:5555"), &[])), Ok(()));
        assert_eq!(outcome(&p, &mut ex(Some("[2001:db8::5]:80"), &[])), Ok(()));
        let e = outcome(&p, &mut ex(Some("10.1.2.3:1"), &[])).unwrap_err();
        assert_eq!(
            e,
            (
                403,
                "accesscontrol.IPDeniedAccess".into(),
                "Access Denied for client ip : 10.1.2.3".into()
            )
        );
        assert!(outcome(&p, &mut ex(Some("192.0.2.1:1"), &[])).is_err());
        // CLIENT_IP ignores what the client writes in X-Forwarded-For.
        assert!(outcome(&p, &mut ex(Some("192.0.2.1:1"), &["10.9.9.9"])).is_err());
        // No address at all: denied.
        let e = outcome(&p, &mut ex(None, &[])).unwrap_err();
        assert_eq!(e.2, "Access Denied for client ip : unknown");
    }

    #[test]
    fn x_forwarded_for_modes() {
        let deny = |basis: &str| {
            build_y(&format!(
                "{{validateBasedOn: {basis}, matchRules: [{{action: DENY, sourceAddresses: [203.0.113.0/24]}}]}}"
            ))
            .unwrap()
        };
        let all = deny("X_FORWARDED_FOR_ALL_IP");
        // Any entry, or the client address itself, denied.
        assert!(outcome(&all, &mut ex(Some("10.0.0.1:1"), &["1.1.1.1, 203.0.113.9"])).is_err());
        assert!(outcome(&all, &mut ex(Some("203.0.113.1:1"), &["1.1.1.1"])).is_err());
        assert_eq!(
            outcome(&all, &mut ex(Some("10.0.0.1:1"), &["1.1.1.1", "2.2.2.2"])),
            Ok(())
        );
        // An entry that is not an address cannot be allowed.
        assert!(outcome(&all, &mut ex(Some("10.0.0.1:1"), &["unknown"])).is_err());
        assert_eq!(
            outcome(&all, &mut ex(Some("10.0.0.1:1"), &["[2001:db8::1]:443"])),
            Ok(())
        );
        let first = deny("X_FORWARDED_FOR_FIRST_IP");
        assert!(outcome(
            &first,
            &mut ex(Some("10.0.0.1:1"), &["203.0.113.9, 1.1.1.1"])
        )
        .is_err());
        assert_eq!(
            outcome(
                &first,
                &mut ex(Some("10.0.0.1:1"), &["1.1.1.1, 203.0.113.9"])
            ),
            Ok(())
        );
        let last = deny("X_FORWARDED_FOR_LAST_IP");
        assert!(outcome(
            &last,
            &mut ex(Some("10.0.0.1:1"), &["1.1.1.1", "203.0.113.9"])
        )
        .is_err());
        assert_eq!(
            outcome(
                &last,
                &mut ex(Some("10.0.0.1:1"), &["203.0.113.9, 1.1.1.1"])
            ),
            Ok(())
        );
        // Without the header, the client address.
        assert!(outcome(&last, &mut ex(Some("203.0.113.2:9"), &[])).is_err());

        // Allow-list with ALL: a forged allowed entry does not let the real address in.
        let allow = build_y(
            "{noRuleMatchAction: DENY, matchRules: [{action: ALLOW, sourceAddresses: [10.0.0.0/8]}]}",
        )
        .unwrap();
        assert!(outcome(&allow, &mut ex(Some("192.0.2.1:1"), &["10.0.0.5"])).is_err());
        assert_eq!(
            outcome(&allow, &mut ex(Some("10.0.0.2:1"), &["10.0.0.5"])),
            Ok(())
        );
    }

    #[test]
    fn refused_at_load() {
        let field = |y: &str| build_y(y).unwrap_err().field;
        assert_eq!(field("{}"), "matchRules");
        assert_eq!(field("{noRuleMatchAction: MAYBE}"), "noRuleMatchAction");
        assert_eq!(
            field("{validateBasedOn: X, noRuleMatchAction: DENY}"),
            "validateBasedOn"
        );
        assert_eq!(
            field("{matchRules: [{action: DENY, sourceAddresses: []}]}"),
            "matchRules[0].sourceAddresses"
        );
        assert_eq!(
            field("{matchRules: [{action: DENY, sourceAddresses: [10.0.0.0/40]}]}"),
            "matchRules[0].sourceAddresses[0]"
        );
        assert_eq!(
            field("{matchRules: [{action: DENY, sourceAddresses: ['{request.header.ip}']}]}"),
            "matchRules[0].sourceAddresses[0]"
        );
        assert_eq!(
            field("{matchRules: [{action: NOPE, sourceAddresses: [1.2.3.4]}]}"),
            "matchRules[0].action"
        );
        // Deny-all is a valid (if blunt) configuration.
        assert!(build_y("{noRuleMatchAction: DENY}").is_ok());
    }
}
