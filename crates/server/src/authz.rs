//! Authorization: default deny, decided from the verified certificate only.
//!
//! | caller | may |
//! |---|---|
//! | node | the Raft service only (enforced on the Raft listener) |
//! | admin | bindings, admin rotation, deregister anything, cluster operations, reads |
//! | service S | register / deregister / keep alive instances of exactly S; reads |
//! | reader | resolve, list, watch, status |

use signpost_identity::{Identity, SpiffeId};
use tonic::{Request, Status};

use crate::error::denied;

/// The verified caller of a client RPC.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The SPIFFE id from the client certificate.
    pub id: SpiffeId,
}

impl Caller {
    /// Extracts and checks the caller's identity; certificates of another trust domain are
    /// refused even if the CA signed them.
    pub fn from_request<T>(request: &Request<T>, trust_domain: &str) -> Result<Caller, Status> {
        // The edge layer already read the certificate; handlers served without it (tests that
        // mount a service alone) read it here.
        let id = match request.extensions().get::<crate::edge::EdgeIdentity>() {
            Some(verified) => verified.0.clone(),
            None => signpost_identity::peer_identity(request)?,
        };
        if id.trust_domain != trust_domain {
            return Err(denied(
                "trust-domain",
                &format!("{id} is not in trust domain {trust_domain}"),
            ));
        }
        Ok(Caller { id })
    }

    /// The caller's SPIFFE URI, recorded in the log for the audit trail.
    pub fn uri(&self) -> String {
        self.id.to_string()
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        matches!(self.id.identity, Identity::Admin(_))
    }

    /// May register or renew instances of `service`.
    pub fn check_register(&self, service: &str) -> Result<(), Status> {
        match &self.id.identity {
            Identity::Service(own) if own == service => Ok(()),
            Identity::Service(own) => Err(denied(
                "service.own-name-only",
                &format!("service {own} may not write service {service}"),
            )),
            _ => Err(denied(
                "register.services-only",
                &format!("{} may not register instances", self.id),
            )),
        }
    }

    /// May deregister an instance of `service`.
    pub fn check_deregister(&self, service: &str) -> Result<(), Status> {
        if self.is_admin() {
            return Ok(());
        }
        self.check_register(service)
    }

    /// May change bindings or the admin set.
    pub fn check_admin(&self, what: &str) -> Result<(), Status> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(denied("admin-only", &format!("{} may not {what}", self.id)))
        }
    }

    /// May read (resolve, list, watch, status).
    pub fn check_read(&self) -> Result<(), Status> {
        match self.id.identity {
            Identity::Reader(_) | Identity::Service(_) | Identity::Admin(_) => Ok(()),
            Identity::Node(_) => Err(denied(
                "node.raft-only",
                "node identities may only use the Raft service",
            )),
        }
    }
}
