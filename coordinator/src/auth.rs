//! Who may call what: API tokens with roles, agent join tokens, and per-agent credentials.
//!
//! Every call but health carries `authorization: Bearer <token>`. A token names a stored row whose
//! secret's SHA-256 is compared in constant time; revocation, expiry and rotation are read from the
//! database on every call, so they take effect on the next one, on every replica.
//!
//! Roles: `viewer` (list, show, watch, rank, download), `submitter` (viewer, plus push, submit,
//! cancel), `admin` (everything: tokens, agents, deletes); `agent-join` (register a new agent, once
//! per use); `agent` (one agent's credential, bound to its id: register again, open its session,
//! download).
//!
//! Agents hold a per-agent secret rather than a client certificate: it works the same behind a
//! TLS-terminating proxy and with `--insecure`, it is revoked and rotated through the same table as
//! every other token (which replicas share), and it needs no revocation lists.

use std::path::Path;

use fleetbench_common::now_ms;
use fleetbench_common::token::{JoinToken, Secret, Token};
use subtle::ConstantTimeEq;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::store::{Store, TokenRecord};

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads, pushes, submits and cancels.
    Submitter,
    /// Everything.
    Admin,
    /// Registers new agents.
    AgentJoin,
    /// One agent's credential.
    Agent,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Admin => "admin",
            Role::AgentJoin => "agent-join",
            Role::Agent => "agent",
        }
    }

    /// A role by name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "viewer" => Role::Viewer,
            "submitter" => Role::Submitter,
            "admin" => Role::Admin,
            "agent-join" => Role::AgentJoin,
            "agent" => Role::Agent,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "role: '{other}' is not a role (viewer, submitter, admin or agent-join)"
                )));
            }
        })
    }
}

/// What a call needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// List, show, watch, rank.
    View,
    /// Read a stored artifact or eval set.
    Download,
    /// Push, submit, cancel.
    Submit,
    /// Tokens, agents, deletes.
    Admin,
    /// Register an agent (a join token or the agent's own credential).
    Register,
    /// An agent's session.
    Agent,
}

impl Need {
    fn what(self) -> &'static str {
        match self {
            Need::View => "read the fleet's jobs, models and rankings",
            Need::Download => "download artifacts",
            Need::Submit => "push models or submit and cancel jobs (that needs submitter or admin)",
            Need::Admin => "administer tokens, agents or deletes (that needs admin)",
            Need::Register => "register an agent (that needs a join token)",
            Need::Agent => "open an agent session (that needs an agent's credential)",
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stored token id.
    pub token_id: String,
    /// Token name (in audit lines).
    pub name: String,
    /// Role.
    pub role: Role,
    /// For an agent's credential, its agent id.
    pub agent_id: String,
}

impl Principal {
    /// Whether this caller may do what `need` names.
    pub fn allows(&self, need: Need) -> bool {
        use Role::*;
        match need {
            Need::View => matches!(self.role, Viewer | Submitter | Admin),
            Need::Download => matches!(self.role, Viewer | Submitter | Admin | Agent),
            Need::Submit => matches!(self.role, Submitter | Admin),
            Need::Admin => self.role == Admin,
            Need::Register => matches!(self.role, AgentJoin | Agent),
            Need::Agent => self.role == Agent,
        }
    }

    /// An audit line: who did what to which object.
    pub fn audit(&self, action: &str, object: &str) {
        tracing::info!(
            target: "fleetbench::audit",
            token = %self.name,
            role = self.role.as_str(),
            action,
            object,
            "Audit."
        );
    }
}

/// How often a token's last use is written (at most once per this many ms per token).
const LAST_USED_EVERY_MS: i64 = 60_000;

/// The caller of a request, from its `authorization` metadata.
pub async fn authenticate(ctx: &Context, bearer: Option<&str>) -> Result<Principal> {
    let Some(bearer) = bearer else {
        return Err(Error::Unauthenticated(
            "this call needs a token: give one with --token or FLEETBENCH_TOKEN (an agent: \
             --join-token); `fleetbench-coordinator init` prints the first ones"
                .into(),
        ));
    };
    let token = Token::parse(bearer).map_err(Error::Unauthenticated)?;
    let invalid =
        || Error::Unauthenticated("the token is not valid (unknown, or rotated since)".into());
    let Some(row) = ctx.store.get_token(&token.id).await? else {
        return Err(invalid());
    };
    let given = token.secret_hash();
    let now = now_ms();
    let mut row = row;
    if !bool::from(given.as_bytes().ct_eq(row.secret_sha256.as_bytes())) {
        // An agent's first call with the credential it was offered in renewal makes it its only one.
        let offered = !row.next_secret_sha256.is_empty()
            && bool::from(given.as_bytes().ct_eq(row.next_secret_sha256.as_bytes()));
        // An offer dies with its credential: a revoked or expired one is not revived by it.
        let lapsed = row.revoked_at > 0 || (row.expires_at > 0 && now >= row.expires_at);
        if !offered || row.role != Role::Agent.as_str() || lapsed {
            return Err(invalid());
        }
        let expires_at = credential_expiry(ctx.config.agent_credential_ttl_ms, now);
        if ctx
            .store
            .promote_token_secret(&row.id, &given, expires_at, now)
            .await?
        {
            tracing::info!(agent = %row.agent_id, "The agent's renewed credential is in use; its old one no longer works.");
            row.expires_at = expires_at;
        } else {
            // Another call promoted it first (or it lapsed meanwhile): read it again.
            match ctx.store.get_token(&token.id).await? {
                Some(now_row)
                    if bool::from(given.as_bytes().ct_eq(now_row.secret_sha256.as_bytes())) =>
                {
                    row = now_row;
                }
                _ => return Err(invalid()),
            }
        }
    }
    if row.revoked_at > 0 {
        return Err(Error::Unauthenticated(format!(
            "token '{}' was revoked",
            row.name
        )));
    }
    if row.expires_at > 0 && now >= row.expires_at {
        return Err(Error::Unauthenticated(format!(
            "token '{}' expired {} s ago",
            row.name,
            (now - row.expires_at) / 1000
        )));
    }
    let role = Role::parse(&row.role)?;
    if role == Role::AgentJoin && row.uses_left == 0 {
        return Err(Error::Unauthenticated(format!(
            "join token '{}' has no uses left",
            row.name
        )));
    }
    if now - row.last_used_at >= LAST_USED_EVERY_MS {
        ctx.store.use_token(&row.id, now, false).await?;
    }
    Ok(Principal {
        token_id: row.id,
        name: row.name,
        role,
        agent_id: row.agent_id,
    })
}

/// The caller, if allowed to do what `need` names: UNAUTHENTICATED without a valid token,
/// PERMISSION_DENIED when its role does not allow it.
pub async fn authorize(ctx: &Context, bearer: Option<&str>, need: Need) -> Result<Principal> {
    let p = authenticate(ctx, bearer).await?;
    if !p.allows(need) {
        return Err(Error::PermissionDenied(format!(
            "token '{}' has role {}, which may not {}",
            p.name,
            p.role.as_str(),
            need.what()
        )));
    }
    Ok(p)
}

/// The bearer token of a request, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let v = metadata.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

/// A new token's row and secret.
fn mint(name: &str, role: Role, ttl_ms: u64, uses: u64, agent_id: &str) -> (TokenRecord, Token) {
    let token = Token::mint();
    let now = now_ms();
    let row = TokenRecord {
        id: token.id.clone(),
        name: name.to_string(),
        role: role.as_str().to_string(),
        secret_sha256: token.secret_hash(),
        agent_id: agent_id.to_string(),
        uses_left: if uses == 0 { -1 } else { uses as i64 },
        created_at: now,
        expires_at: if ttl_ms == 0 { 0 } else { now + ttl_ms as i64 },
        revoked_at: 0,
        last_used_at: 0,
        next_secret_sha256: String::new(),
    };
    (row, token)
}

/// What a token's holder is given: the token, or for `agent-join` the whole join token with the
/// CA's fingerprint (empty without TLS).
fn handed_out(role: Role, token: &Token, ca_sha256: &str) -> Secret {
    match role {
        Role::AgentJoin => JoinToken {
            ca_sha256: ca_sha256.to_string(),
            token: token.clone(),
        }
        .to_secret_string(),
        _ => token.to_secret_string(),
    }
}

/// Checks a token name: 1 to 64 characters, letters, digits, `-`, `_`, `.`.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Error::InvalidArgument(format!(
            "name: '{name}' is not a token name (1 to 64 letters, digits, '-', '_' or '.')"
        )));
    }
    Ok(())
}

/// Creates a token; returns its row and what to hand its holder.
pub async fn create_token(
    store: &dyn Store,
    ca_sha256: &str,
    name: &str,
    role: Role,
    ttl_ms: u64,
    uses: u64,
) -> Result<(TokenRecord, Secret)> {
    check_name(name)?;
    if role == Role::Agent {
        return Err(Error::InvalidArgument(
            "role: agent credentials are issued when an agent joins, not created".into(),
        ));
    }
    if uses > 0 && role != Role::AgentJoin {
        return Err(Error::InvalidArgument(
            "uses: only agent-join tokens have a use count".into(),
        ));
    }
    let (row, token) = mint(name, role, ttl_ms, uses, "");
    store.insert_token(&row).await?;
    Ok((row.clone(), handed_out(role, &token, ca_sha256)))
}

/// A token by name, or NOT_FOUND naming it. Agents' credentials are managed through their agent.
pub async fn token_named(store: &dyn Store, name: &str) -> Result<TokenRecord> {
    match store.token_by_name(name).await? {
        Some(t) if t.role != Role::Agent.as_str() => Ok(t),
        _ => Err(Error::NotFound(format!("no token named '{name}'"))),
    }
}

/// Gives a token a new secret; the old one fails from the next call.
pub async fn rotate_token(
    store: &dyn Store,
    ca_sha256: &str,
    name: &str,
) -> Result<(TokenRecord, Secret)> {
    let row = token_named(store, name).await?;
    if row.revoked_at > 0 {
        return Err(Error::FailedPrecondition(format!(
            "token '{name}' is revoked; create a new one"
        )));
    }
    let token = Token {
        id: row.id.clone(),
        ..Token::mint()
    };
    store
        .set_token_secret(&row.id, &token.secret_hash())
        .await?;
    let role = Role::parse(&row.role)?;
    Ok((row, handed_out(role, &token, ca_sha256)))
}

/// The stored name of an agent's credential.
pub fn agent_token_name(agent_id: &str) -> String {
    format!("agent:{agent_id}")
}

/// Issues a new credential for `agent_id`, valid for `ttl_ms` (0: until revoked); any earlier one
/// stops working.
pub async fn issue_agent_credential(
    store: &dyn Store,
    agent_id: &str,
    ttl_ms: u64,
) -> Result<Secret> {
    let (row, token) = mint(
        &agent_token_name(agent_id),
        Role::Agent,
        ttl_ms,
        0,
        agent_id,
    );
    store.replace_agent_credential(&row).await?;
    Ok(token.to_secret_string())
}

/// When a credential made or renewed at `now` expires (0: never).
fn credential_expiry(ttl_ms: u64, now: i64) -> i64 {
    if ttl_ms == 0 { 0 } else { now + ttl_ms as i64 }
}

/// Whether an agent's credential is due for renewal at `now`: in the second half of its validity; made
/// without an expiry while credentials now have one; or with an expiry while they now have none.
pub fn renewal_due(row: &TokenRecord, ttl_ms: u64, now: i64) -> bool {
    if ttl_ms == 0 {
        return row.expires_at > 0;
    }
    row.expires_at == 0 || row.expires_at - now <= ttl_ms as i64 / 2
}

/// Offers agent credential `row` a new secret, which becomes its only one when first used (the old
/// one works until then, so an answer lost on the way costs nothing). Returns the new credential.
pub async fn renew_agent_credential(store: &dyn Store, row: &TokenRecord) -> Result<Secret> {
    let token = Token {
        id: row.id.clone(),
        ..Token::mint()
    };
    store
        .offer_token_secret(&row.id, &token.secret_hash())
        .await?;
    Ok(token.to_secret_string())
}

/// The tokens `init` (or a first start) makes.
#[derive(Debug)]
pub struct InitialTokens {
    /// The `admin` token.
    pub admin: Secret,
    /// The `agents` join token.
    pub join: Secret,
}

/// File names of the initial tokens in the data directory (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// See [`ADMIN_TOKEN_FILE`].
pub const JOIN_TOKEN_FILE: &str = "join.token";

fn usable_admin(tokens: &[TokenRecord], now: i64) -> bool {
    tokens.iter().any(|t| {
        t.role == Role::Admin.as_str()
            && t.revoked_at == 0
            && (t.expires_at == 0 || t.expires_at > now)
    })
}

/// Whether the store holds an admin token that works.
pub async fn has_admin(store: &dyn Store) -> Result<bool> {
    Ok(usable_admin(&store.list_tokens().await?, now_ms()))
}

/// Makes the first admin token (`admin`) and join token (`agents`, no expiry, no use limit) unless a
/// working admin token exists, and writes them to `data_dir` (mode 0600). None when one existed.
pub async fn bootstrap(
    store: &dyn Store,
    data_dir: &Path,
    ca_sha256: &str,
) -> Result<Option<InitialTokens>> {
    let tokens = store.list_tokens().await?;
    if usable_admin(&tokens, now_ms()) {
        return Ok(None);
    }
    let free = |base: &str| {
        (0..)
            .map(|i| {
                if i == 0 {
                    base.to_string()
                } else {
                    format!("{base}-{i}")
                }
            })
            .find(|n| !tokens.iter().any(|t| &t.name == n))
            .unwrap_or_default()
    };
    let (_, admin) = create_token(store, ca_sha256, &free("admin"), Role::Admin, 0, 0).await?;
    let (_, join) = create_token(store, ca_sha256, &free("agents"), Role::AgentJoin, 0, 0).await?;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::io("cannot create the data directory", e))?;
    crate::tls::write_file(&data_dir.join(ADMIN_TOKEN_FILE), admin.expose(), true)?;
    crate::tls::write_file(&data_dir.join(JOIN_TOKEN_FILE), join.expose(), true)?;
    Ok(Some(InitialTokens { admin, join }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_due_for_renewal_in_its_second_half_and_when_the_ttl_setting_changed() {
        let day = 86_400_000i64;
        let row = |expires_at| TokenRecord {
            id: "i".into(),
            name: "agent:a".into(),
            role: "agent".into(),
            secret_sha256: "s".into(),
            agent_id: "a".into(),
            uses_left: -1,
            created_at: 0,
            expires_at,
            revoked_at: 0,
            last_used_at: 0,
            next_secret_sha256: String::new(),
        };
        let ttl = 30 * day as u64;
        assert!(!renewal_due(&row(20 * day), ttl, 0));
        assert!(renewal_due(&row(15 * day), ttl, 0));
        // Made before credentials expired: renewed into one that does.
        assert!(renewal_due(&row(0), ttl, 0));
        // Made while they expired, and now they last until revoked: renewed into one that does not
        // (before the fix it was never renewed, and expired).
        assert!(renewal_due(&row(20 * day), 0, 0));
        assert!(!renewal_due(&row(0), 0, 0));
    }

    fn p(role: Role) -> Principal {
        Principal {
            token_id: "t".into(),
            name: "n".into(),
            role,
            agent_id: String::new(),
        }
    }

    #[test]
    fn roles_allow_what_they_say() {
        let table = [
            (Role::Viewer, [true, true, false, false, false, false]),
            (Role::Submitter, [true, true, true, false, false, false]),
            (Role::Admin, [true, true, true, true, false, false]),
            (Role::AgentJoin, [false, false, false, false, true, false]),
            (Role::Agent, [false, true, false, false, true, true]),
        ];
        let needs = [
            Need::View,
            Need::Download,
            Need::Submit,
            Need::Admin,
            Need::Register,
            Need::Agent,
        ];
        for (role, allowed) in table {
            for (need, want) in needs.iter().zip(allowed) {
                assert_eq!(p(role).allows(*need), want, "{role:?} {need:?}");
            }
            assert_eq!(Role::parse(role.as_str()).unwrap(), role);
        }
        assert!(Role::parse("root").is_err());
        assert!(check_name("ci-2.x_y").is_ok());
        assert!(check_name("a b").is_err());
        assert!(check_name("").is_err());
    }
}
