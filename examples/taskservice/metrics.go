package main

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/seed-b4ec662f/cacheaside"
)

// promRecorder exports the library's events to Prometheus (lecture 5.4:
// "replace with Prometheus in production"). Labels are cache names, never
// keys, so the series count stays small.
type promRecorder struct {
	cacheaside.NopRecorder
	requests  *prometheus.CounterVec   // cache, result=hit|negative_hit|miss
	loads     *prometheus.HistogramVec // cache, result=ok|not_found|error
	stale     *prometheus.CounterVec   // cache
	redisErrs *prometheus.CounterVec   // cache, op
	invals    *prometheus.CounterVec   // cache
	coalesced *prometheus.CounterVec   // cache
}

func newPromRecorder(reg prometheus.Registerer) *promRecorder {
	r := &promRecorder{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cache_requests_total", Help: "Cache Gets by outcome of the first read.",
		}, []string{"cache", "result"}),
		loads: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cache_load_seconds", Help: "Loader (database) calls made by the cache.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"cache", "result"}),
		stale: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cache_stale_served_total", Help: "Values served past their TTL.",
		}, []string{"cache"}),
		redisErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cache_redis_errors_total", Help: "Failed Redis commands; the request still got an answer.",
		}, []string{"cache", "op"}),
		invals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cache_invalidations_total", Help: "Keys deleted or namespaces bumped.",
		}, []string{"cache"}),
		coalesced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cache_coalesced_total", Help: "Gets that shared another Get's load.",
		}, []string{"cache"}),
	}
	reg.MustRegister(r.requests, r.loads, r.stale, r.redisErrs, r.invals, r.coalesced)
	return r
}

func (r *promRecorder) Hit(cache string) { r.requests.WithLabelValues(cache, "hit").Inc() }
func (r *promRecorder) NegativeHit(cache string) {
	r.requests.WithLabelValues(cache, "negative_hit").Inc()
}
func (r *promRecorder) Miss(cache string)        { r.requests.WithLabelValues(cache, "miss").Inc() }
func (r *promRecorder) Coalesced(cache string)   { r.coalesced.WithLabelValues(cache).Inc() }
func (r *promRecorder) StaleServed(cache string) { r.stale.WithLabelValues(cache).Inc() }
func (r *promRecorder) Invalidated(cache string, n int) {
	r.invals.WithLabelValues(cache).Add(float64(n))
}
func (r *promRecorder) RedisError(cache, op string, _ error) {
	r.redisErrs.WithLabelValues(cache, op).Inc()
}
func (r *promRecorder) Load(cache string, d time.Duration, err error) {
	result := "ok"
	switch {
	case errors.Is(err, cacheaside.ErrNotFound):
		result = "not_found"
	case err != nil:
		result = "error"
	}
	r.loads.WithLabelValues(cache, result).Observe(d.Seconds())
}
