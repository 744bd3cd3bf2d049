//! The shardmesh sidecar: an inbound and an outbound HTTP proxy plus an admin server, built as
//! tower stacks (see [`outbound::stack`] and [`inbound::stack`] for the request paths, top to
//! bottom). One concern per module:
//!
//! | module | concern |
//! | --- | --- |
//! | [`config`] | flags/env, the resilience policy, validation |
//! | [`inbound`] | forward to the app behind a shedding bulkhead |
//! | [`ownership`] | this shard's keys only, handoff during resharding |
//! | [`outbound`] | explicit proxy, destination resolution, the outbound stack |
//! | [`discovery`] | the `Discover` trait and the static registry file |
//! | [`shardmap_watch`] | live shard maps from the operator's ShardMapSlices |
//! | [`membership`] | the pod's registry Lease: renew, pause, release |
//! | [`leader`] | per-shard leader election, the role told to the app |
//! | [`timeout`] | overall deadline and per-try timeout |
//! | [`retry`] | retry rules, replay buffer, backoff |
//! | [`budget`] | sliding-window retry budget |
//! | [`balance`] | P2C peak-EWMA and breaker bookkeeping |
//! | [`breaker`] | the circuit-breaker state machine |
//! | [`client`] | pooled upstream client, connect timeout |
//! | [`access_log`] | one JSON line per request |
//! | [`trace`] | W3C trace context: continue or start, one span per hop |
//! | [`log`] | non-blocking JSON logging, run-time level |
//! | [`metrics`] | Prometheus counters and histograms |
//! | [`admin`] | /live, /ready, /metrics, /drain, /shutdown, /log-level |
//! | [`drain`] | graceful shutdown, ordered inbound → app → outbound |
//! | [`server`] | accept loop shared by the proxies |
//! | [`resident`] | start-up code pages out of the resident set once started |

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod budget;
pub mod client;
pub mod config;
pub mod ctx;
pub mod discovery;
pub mod drain;
pub mod errors;
pub mod hash;
pub mod headers;
pub mod inbound;
pub mod leader;
pub mod log;
pub mod membership;
pub mod metrics;
pub mod outbound;
pub mod ownership;
pub mod resident;
pub mod retry;
pub mod server;
pub mod shardmap_watch;
pub mod timeout;
pub mod trace;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle, time::Instant};

use crate::{
    admin::Admin,
    balance::Endpoints,
    budget::RetryBudget,
    config::{ConfigError, Settings},
    drain::{Connections, Drain, Phase, APP_POLL_INTERVAL},
    log::LevelControl,
    metrics::Metrics,
};

/// A started sidecar.
pub struct Running {
    /// Bound inbound address (None when `--app-port` is unset).
    pub inbound: Option<SocketAddr>,
    /// Bound outbound address.
    pub outbound: SocketAddr,
    /// Bound admin address.
    pub admin: SocketAddr,
    /// Lifecycle control.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The inbound proxy, its connections and the application behind it (None without
    /// `--app-port`).
    inbound_side: Option<InboundSide>,
    outbound_server: JoinHandle<()>,
    /// Outbound connections, counted apart from inbound ones: they close after the app exits.
    outbound_connections: Connections,
    admin_task: JoinHandle<()>,
    drain_delay: Duration,
    grace_period: Duration,
    /// Membership and leader election: they release their Leases when the drain begins.
    registry_tasks: Vec<JoinHandle<()>>,
    /// The start-up steps `/ready` waits for.
    gates: admin::StartupGates,
}

/// What the ordered drain needs of the inbound side.
struct InboundSide {
    server: JoinHandle<()>,
    connections: Connections,
    app: SocketAddr,
}

/// Least time outbound connections get to finish once the application exited, even when the
/// grace period is used up (an in-flight call of the application's last moments).
const OUTBOUND_FINISH_MIN: Duration = Duration::from_secs(1);

/// How much longer than drain delay + grace period `POST /drain` may wait for the inbound
/// drain before answering 503 (scheduling slack; the drain itself is bounded by those two).
const DRAIN_ANSWER_SLACK: Duration = Duration::from_secs(1);

/// How long the exit waits for the Leases to be released after the listeners closed (it was
/// started when the drain began, so this is only reached with a slow API server).
const RELEASE_WAIT: Duration = Duration::from_secs(3);

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "the port is in use by another process; stop it or choose another port"
        } else {
            "choose an address of this host"
        };
        ConfigError::new(flag, format!("cannot listen on {addr}: {e}; {hint}"))
    })
}

/// Binds every listener (errors name the flag) and starts serving, with fresh metrics.
pub async fn start(
    settings: Settings,
    level: Option<LevelControl>,
) -> Result<Running, ConfigError> {
    start_with(settings, level, Arc::new(Metrics::default())).await
}

/// Like [`start`], recording into `metrics` (shared with the log writer, so dropped log lines
/// show up in `/metrics`).
pub async fn start_with(
    settings: Settings,
    level: Option<LevelControl>,
    metrics: Arc<Metrics>,
) -> Result<Running, ConfigError> {
    let Settings {
        args,
        policy,
        registry,
        access_log,
        membership,
        shardmaps,
        leader,
        own,
        conn,
    } = settings;
    let drain = Drain::new();
    let gates = admin::StartupGates::default();
    let outbound_connections = Connections::new();

    let admin_l = bind(args.admin_addr, "--admin-addr (SHARDMESH_ADMIN_ADDR)").await?;
    let outbound_l = bind(
        args.outbound_addr,
        "--outbound-addr (SHARDMESH_OUTBOUND_ADDR)",
    )
    .await?;
    let inbound_l = match args.app_port {
        Some(_) => Some(bind(args.inbound_addr, "--inbound-addr (SHARDMESH_INBOUND_ADDR)").await?),
        None => None,
    };
    let local = |l: &TcpListener, flag: &str| {
        l.local_addr()
            .map_err(|e| ConfigError::new(flag, format!("cannot read the bound address: {e}")))
    };
    let admin_addr = local(&admin_l, "--admin-addr")?;
    let outbound_addr = local(&outbound_l, "--outbound-addr")?;
    let inbound_addr = match &inbound_l {
        Some(l) => Some(local(l, "--inbound-addr")?),
        None => None,
    };
    let app = args.app_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));

    // The API client is only built when Kubernetes is used, so standalone runs need no cluster.
    let kube_client = if membership.is_some() || !shardmaps.is_empty() {
        let flag = if membership.is_some() {
            "--service (SHARDMESH_SERVICE)"
        } else {
            "--shardmap (SHARDMESH_SHARDMAPS)"
        };
        Some(kube::Client::try_default().await.map_err(|e| {
            ConfigError::new(
                flag,
                format!(
                    "needs the Kubernetes API, but no in-cluster config or KUBECONFIG works: {e}"
                ),
            )
        })?)
    } else {
        None
    };
    let live_maps = kube_client.is_some() && !shardmaps.is_empty();
    let discovery: Arc<dyn discovery::Discover> = match &kube_client {
        Some(client) if !shardmaps.is_empty() => {
            let live = Arc::new(shardmap_watch::LiveRegistry::new(registry));
            let own_ns = args.pod_namespace.clone().unwrap_or_default();
            for source in shardmaps {
                let synced = gates.add(format!(
                    "the first sync of the shard map of {}",
                    source.service
                ));
                tokio::spawn(shardmap_watch::watch(
                    client.clone(),
                    own_ns.clone(),
                    source,
                    live.clone(),
                    synced,
                ));
            }
            live
        }
        _ => Arc::new(registry),
    };
    let role = leader.as_ref().map(|_| leader::RoleState::default());
    let mut registry_tasks = Vec::new();
    if let (Some(cfg), Some(client)) = (leader, &kube_client) {
        let role = role.clone().unwrap_or_default();
        registry_tasks.push(tokio::spawn(leader::run(
            client.clone(),
            cfg,
            role,
            drain.clone(),
        )));
    }
    if let (Some(cfg), Some(own), true) = (&membership, &own, live_maps) {
        let listed = gates.add(format!(
            "this pod's listing in the shard map of {}",
            cfg.identity.service
        ));
        tokio::spawn(shardmap_watch::wait_listed(
            discovery.clone(),
            own.authority.clone(),
            own.shard,
            cfg.identity.address,
            listed,
        ));
    }
    if let (Some(cfg), Some(client)) = (membership, kube_client) {
        let registered = gates.add("the registration of this pod's Lease");
        registry_tasks.push(tokio::spawn(membership::run(
            client,
            cfg,
            drain.clone(),
            registered,
        )));
    }

    let outbound = outbound::Outbound {
        discovery,
        passthrough: args.passthrough,
        endpoints: Arc::new(Endpoints::new(policy.breaker)),
        budget: Arc::new(RetryBudget::new(policy.budget)),
        metrics: metrics.clone(),
        access_log,
        policy: policy.clone(),
    };
    let outbound_server = tokio::spawn(server::serve(
        outbound_l,
        server::HttpService::new(outbound::stack(&outbound)),
        conn,
        Some(server::Closing {
            drain: drain.clone(),
            at: Phase::Stopped,
            token: outbound_connections.token(),
        }),
    ));
    let mut inbound_side = None;
    if let (Some(l), Some(app)) = (inbound_l, app) {
        let inbound = inbound::Inbound {
            app,
            max_in_flight: policy.max_in_flight,
            shed_retry_after: args.shed_retry_after,
            connect_timeout: policy.connect,
            deadline: policy.overall,
            metrics: metrics.clone(),
            access_log,
            role,
            ownership: own.map(|o| ownership::Ownership {
                shard: o.shard,
                authority: o.authority.into(),
                discovery: outbound.discovery.clone(),
                client: client::Upstream::new(policy.connect),
                handoff_timeout: policy.per_try,
                metrics: metrics.clone(),
            }),
        };
        let connections = Connections::new();
        let server = tokio::spawn(server::serve(
            l,
            server::HttpService::new(inbound::stack(&inbound)),
            conn,
            Some(server::Closing {
                drain: drain.clone(),
                at: Phase::InboundClosed,
                token: connections.token(),
            }),
        ));
        inbound_side = Some(InboundSide {
            server,
            connections,
            app,
        });
    }
    let admin_task = tokio::spawn(admin::serve(
        admin_l,
        Admin {
            drain: drain.clone(),
            metrics: metrics.clone(),
            discovery: Some(outbound.discovery.clone()),
            app,
            level,
            gates: gates.clone(),
            drain_answer_within: args.drain_delay + args.grace_period + DRAIN_ANSWER_SLACK,
        },
        conn.admin(),
    ));
    tracing::info!(
        inbound = inbound_addr.map(tracing::field::display),
        app = app.map(tracing::field::display),
        outbound = %outbound_addr,
        admin = %admin_addr,
        "shardmesh-sidecar started"
    );
    Ok(Running {
        inbound: inbound_addr,
        outbound: outbound_addr,
        admin: admin_addr,
        drain,
        metrics,
        inbound_side,
        outbound_server,
        outbound_connections,
        admin_task,
        drain_delay: args.drain_delay,
        grace_period: args.grace_period,
        registry_tasks,
        gates,
    })
}

impl Running {
    /// Returns once start-up is over: the listeners are bound (they are when [`start`]
    /// returns) and every registry step `/ready` waits for is done (the first shard-map syncs,
    /// the pod's listing and its Lease).
    pub fn started(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let gates = self.gates.clone();
        async move { gates.all_open().await }
    }

    /// Runs the shutdown sequence once a drain has begun (SIGTERM, `POST /drain` or
    /// `/shutdown`), as described in [`drain`]: keep accepting for the drain delay, then close
    /// inbound, wait for its requests, keep outbound until the application exited, close it.
    /// Returns whether every connection finished in time.
    pub async fn drained(self) -> bool {
        let Running {
            drain,
            inbound_side,
            outbound_server,
            outbound_connections,
            admin_task,
            drain_delay,
            grace_period,
            registry_tasks,
            ..
        } = self;
        drain.reached(Phase::Draining).await;
        if !drain.is_immediate() {
            tracing::info!(delay = ?drain_delay, "draining: readiness fails; still accepting during the drain delay");
            tokio::select! {
                _ = tokio::time::sleep(drain_delay) => {}
                _ = drain.immediate_requested() => {
                    tracing::info!("shutdown requested during the drain delay; closing now");
                }
            }
        }
        let clean = match inbound_side {
            Some(inbound) if !drain.is_immediate() => {
                ordered(
                    &drain,
                    inbound,
                    outbound_server,
                    outbound_connections,
                    grace_period,
                )
                .await
            }
            inbound => {
                all_at_once(
                    &drain,
                    inbound,
                    outbound_server,
                    outbound_connections,
                    grace_period,
                )
                .await
            }
        };
        let release = futures::future::join_all(registry_tasks);
        if tokio::time::timeout(RELEASE_WAIT, release).await.is_err() {
            tracing::warn!("leases not released in time; they expire by themselves");
        }
        admin_task.abort();
        clean
    }
}

/// Inbound first, then the application, then outbound (see [`drain`]); one grace period covers
/// the inbound requests and the application's exit.
async fn ordered(
    drain: &Drain,
    inbound: InboundSide,
    outbound_server: JoinHandle<()>,
    outbound_connections: Connections,
    grace: Duration,
) -> bool {
    let deadline = Instant::now() + grace;
    drain.advance(Phase::InboundClosed);
    let _ = inbound.server.await;
    tracing::info!(grace = ?grace, "inbound listener closed; waiting for in-flight inbound requests (outbound stays open)");
    let inbound_clean = inbound.connections.wait(grace).await;
    if inbound_clean {
        tracing::info!("inbound drained: every inbound request finished");
    } else {
        tracing::warn!("grace period over with inbound requests still in flight; going on");
    }
    drain.advance(Phase::InboundDrained);
    let left = deadline.saturating_duration_since(Instant::now());
    tracing::info!(app = %inbound.app, within = ?left, "outbound stays open until the application exits");
    let app = inbound.app;
    let exited = tokio::select! {
        exited = drain::app_exited(|| drain::app_refuses(app), APP_POLL_INTERVAL, left) => exited,
        // The application said it is done.
        _ = drain.immediate_requested() => true,
    };
    if exited {
        tracing::info!("the application exited; closing outbound");
    } else {
        tracing::warn!(
            "grace period over with the application still running; closing outbound anyway"
        );
    }
    drain.stop();
    let _ = outbound_server.await;
    let within = deadline
        .saturating_duration_since(Instant::now())
        .max(OUTBOUND_FINISH_MIN);
    let outbound_clean = outbound_connections.wait(within).await;
    if outbound_clean {
        tracing::info!("all outbound requests finished");
    } else {
        tracing::warn!("outbound requests still in flight; exiting anyway");
    }
    inbound_clean && outbound_clean
}

/// Every listener at once (no inbound proxy, or `/shutdown`): nothing to order.
async fn all_at_once(
    drain: &Drain,
    inbound: Option<InboundSide>,
    outbound_server: JoinHandle<()>,
    outbound_connections: Connections,
    grace: Duration,
) -> bool {
    drain.stop();
    let inbound_connections = match inbound {
        Some(i) => {
            let _ = i.server.await;
            Some(i.connections)
        }
        None => None,
    };
    let _ = outbound_server.await;
    tracing::info!(grace = ?grace, "listeners closed; waiting for in-flight requests");
    let inbound_done = async {
        match inbound_connections {
            Some(c) => c.wait(grace).await,
            None => true,
        }
    };
    let (inbound_clean, outbound_clean) =
        tokio::join!(inbound_done, outbound_connections.wait(grace));
    let clean = inbound_clean && outbound_clean;
    if clean {
        tracing::info!("all in-flight requests finished");
    } else {
        tracing::warn!("grace period over with requests still in flight; exiting anyway");
    }
    clean
}
