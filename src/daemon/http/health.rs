//! Readiness and draining, kept in the `echod_ready` and `echod_draining` gauges
//! Prometheus scrapes, so `/readyz` and the metrics can never disagree.

use prometheus::IntGauge;

use crate::daemon::metrics::Metrics;

/// Readiness, stored once: in the gauges the metrics expose.
pub(crate) struct Health {
    ready: IntGauge,
    draining: IntGauge,
}

impl Health {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        Self {
            ready: metrics.ready.clone(),
            draining: metrics.draining.clone(),
        }
    }

    /// Every listener is bound and serving.
    pub(crate) fn set_ready(&self) {
        self.ready.set(1);
    }

    /// A stop has begun: readiness fails from now on.
    pub(crate) fn set_draining(&self) {
        self.ready.set(0);
        self.draining.set(1);
    }

    pub(super) fn is_ready(&self) -> bool {
        self.ready.get() == 1 && !self.is_draining()
    }

    pub(super) fn is_draining(&self) -> bool {
        self.draining.get() == 1
    }
}
