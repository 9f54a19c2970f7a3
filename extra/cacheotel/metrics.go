package cacheotel

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/seed-b4ec662f/cacheaside"
)

type meterProvider = metric.MeterProvider

// WithMeterProvider sets the MeterProvider (default: otel's global one).
func WithMeterProvider(mp metric.MeterProvider) Option { return func(c *config) { c.mp = mp } }

// Source is a cache Metrics reads: any *cacheaside.Cache[T].
type Source interface {
	Name() string
	Stats() cacheaside.Stats
}

// stat is one Stats counter exported as an observable counter.
type stat struct {
	name, unit, desc string
	value            func(*cacheaside.Stats) uint64
}

// stats lists every Stats counter exported one to one; the requests and
// loads (one instrument each, with a result attribute) and the gauges are
// built apart.
var stats = []stat{
	{"cacheaside.local_hits", "{request}", "Gets the local tier answered with a value (part of the hits).", func(s *cacheaside.Stats) uint64 { return s.LocalHits }},
	{"cacheaside.local_negative_hits", "{request}", "Gets the local tier answered \"not found\" (part of the negative hits).", func(s *cacheaside.Stats) uint64 { return s.LocalNegativeHits }},
	{"cacheaside.coalesced", "{request}", "Gets that shared a load another Get of this process ran.", func(s *cacheaside.Stats) uint64 { return s.Coalesced }},
	{"cacheaside.lease_contended", "{key}", "Keys whose load waited for another holder's fill.", func(s *cacheaside.Stats) uint64 { return s.LeaseContended }},
	{"cacheaside.fills_rejected", "{fill}", "Fills refused because their lease was gone.", func(s *cacheaside.Stats) uint64 { return s.FillsRejected }},
	{"cacheaside.not_cached", "{value}", "Loaded values not cached: too large or not encodable.", func(s *cacheaside.Stats) uint64 { return s.NotCached }},
	{"cacheaside.decode_errors", "{entry}", "Entries that could not be decoded.", func(s *cacheaside.Stats) uint64 { return s.DecodeErrors }},
	{"cacheaside.redis.errors", "{command}", "Redis commands sent that failed.", func(s *cacheaside.Stats) uint64 { return s.RedisErrors }},
	{"cacheaside.redis.skipped", "{command}", "Redis commands not sent: breaker open, or the Get's Redis time spent.", func(s *cacheaside.Stats) uint64 { return s.RedisSkipped }},
	{"cacheaside.stale_served", "{request}", "Answers with a value past its TTL (stale-while-revalidate).", func(s *cacheaside.Stats) uint64 { return s.StaleServed }},
	{"cacheaside.stale_if_error", "{request}", "Answers with the old value because its reload failed.", func(s *cacheaside.Stats) uint64 { return s.StaleIfError }},
	{"cacheaside.refreshes", "{refresh}", "Background refreshes that ran their loader.", func(s *cacheaside.Stats) uint64 { return s.Refreshes }},
	{"cacheaside.refresh_errors", "{refresh}", "Background refreshes that failed.", func(s *cacheaside.Stats) uint64 { return s.RefreshErrors }},
	{"cacheaside.invalidated_keys", "{key}", "Keys deleted by Invalidate and InvalidatePrefix.", func(s *cacheaside.Stats) uint64 { return s.Invalidations }},
	{"cacheaside.namespace_bumps", "{bump}", "Namespaces given a new generation.", func(s *cacheaside.Stats) uint64 { return s.NamespaceBumps }},
	{"cacheaside.breaker.opens", "{open}", "Times the Redis circuit breaker opened.", func(s *cacheaside.Stats) uint64 { return s.BreakerOpens }},
	{"cacheaside.overloaded", "{request}", "Gets refused with ErrOverloaded.", func(s *cacheaside.Stats) uint64 { return s.Overloaded }},
	{"cacheaside.invalidations.queued", "{invalidation}", "Failed invalidations queued for retry.", func(s *cacheaside.Stats) uint64 { return s.QueuedInvals }},
	{"cacheaside.invalidations.retried", "{invalidation}", "Failed invalidations applied later by a retry.", func(s *cacheaside.Stats) uint64 { return s.RetriedInvals }},
	{"cacheaside.invalidations.dropped", "{invalidation}", "Failed invalidations given up.", func(s *cacheaside.Stats) uint64 { return s.DroppedInvals }},
	{"cacheaside.local.flushes", "{flush}", "Times the local tier was emptied.", func(s *cacheaside.Stats) uint64 { return s.LocalFlushes }},
	{"cacheaside.bus.messages", "{message}", "Invalidation messages received from the bus.", func(s *cacheaside.Stats) uint64 { return s.BusMessages }},
}

// Metrics exports caches' Stats through the OpenTelemetry metric API, and
// is the cacheaside.Recorder that feeds the load-duration histogram.
type Metrics struct {
	cacheaside.NopRecorder
	meter    metric.Meter
	attrs    []attribute.KeyValue
	loadTime metric.Float64Histogram

	sets sync.Map // cache name → metric.MeasurementOption, its attribute set, built once (read by Load without a lock)

	mu      sync.Mutex // protects names and regs
	names   map[string]bool
	regs    []metric.Registration
	counts  []metric.Int64ObservableCounter
	gauges  map[string]metric.Int64ObservableGauge
	reqs    metric.Int64ObservableCounter
	loads   metric.Int64ObservableCounter
	pending metric.Int64ObservableUpDownCounter
}

// NewMetrics creates the instruments on the meter of the MeterProvider
// (otel's global one unless WithMeterProvider says otherwise):
//
//   - cacheaside.requests{cacheaside.cache, cacheaside.result}: Gets by
//     the outcome of the first read, result "hit", "negative_hit" or
//     "miss" (a GetMany counts once per distinct key);
//   - cacheaside.loads{result "ok" or "error"}: loader calls;
//   - cacheaside.load.duration (s): a histogram of loader calls, recorded
//     by Metrics as the caches' Recorder (Options.Recorder: m);
//   - one observable counter per other Stats counter (cacheaside.coalesced,
//     cacheaside.redis.errors, cacheaside.redis.skipped, ...);
//   - cacheaside.invalidations.pending (an up-down counter),
//     cacheaside.breaker.state{state} (1 for the current state of
//     "closed", "open" and "half-open"), cacheaside.local.live (0 or 1)
//     and cacheaside.local.entries (gauges).
//
// The observable instruments read Stats once per cache per collection, so
// they cost the request path nothing.
func NewMetrics(opts ...Option) (*Metrics, error) {
	c := newConfig(opts)
	m := &Metrics{meter: c.mp.Meter(ScopeName), attrs: c.attrs, names: map[string]bool{}, gauges: map[string]metric.Int64ObservableGauge{}}
	var err error
	bounds := make([]float64, cacheaside.NumLoadBuckets)
	for i := range bounds {
		bounds[i] = cacheaside.LoadBucket(i).Seconds()
	}
	if m.loadTime, err = m.meter.Float64Histogram("cacheaside.load.duration", metric.WithUnit("s"),
		metric.WithDescription("Time spent in each loader call."), metric.WithExplicitBucketBoundaries(bounds...)); err != nil {
		return nil, err
	}
	if m.reqs, err = m.meter.Int64ObservableCounter("cacheaside.requests", metric.WithUnit("{request}"),
		metric.WithDescription("Gets by the outcome of their first read: hit, negative_hit or miss.")); err != nil {
		return nil, err
	}
	if m.loads, err = m.meter.Int64ObservableCounter("cacheaside.loads", metric.WithUnit("{call}"),
		metric.WithDescription("Loader calls by result: ok (a value or not found) or error.")); err != nil {
		return nil, err
	}
	if m.pending, err = m.meter.Int64ObservableUpDownCounter("cacheaside.invalidations.pending", metric.WithUnit("{invalidation}"),
		metric.WithDescription("Failed invalidations still waiting for a retry.")); err != nil {
		return nil, err
	}
	for _, g := range []struct{ name, unit, desc string }{
		{"cacheaside.breaker.state", "1", "The Redis circuit breaker's state: 1 for the current one, all 0 when disabled."},
		{"cacheaside.local.live", "1", "1 while the local tier is in use."},
		{"cacheaside.local.entries", "{entry}", "Entries the local tier holds (an estimate)."},
	} {
		if m.gauges[g.name], err = m.meter.Int64ObservableGauge(g.name, metric.WithUnit(g.unit), metric.WithDescription(g.desc)); err != nil {
			return nil, err
		}
	}
	for _, s := range stats {
		ctr, err := m.meter.Int64ObservableCounter(s.name, metric.WithUnit(s.unit), metric.WithDescription(s.desc))
		if err != nil {
			return nil, err
		}
		m.counts = append(m.counts, ctr)
	}
	return m, nil
}

// Add starts observing caches. It returns an error, and adds none, if a
// name is already observed or appears twice.
func (m *Metrics) Add(caches ...Source) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := map[string]bool{}
	for _, s := range caches {
		if s == nil {
			return fmt.Errorf("cacheotel: nil cache")
		}
		if n := s.Name(); m.names[n] || seen[n] {
			return fmt.Errorf("cacheotel: two caches named %q: give each an Options.Name of its own", n)
		}
		seen[s.Name()] = true
	}
	insts := []metric.Observable{m.reqs, m.loads, m.pending}
	for _, g := range m.gauges {
		insts = append(insts, g)
	}
	for _, c := range m.counts {
		insts = append(insts, c)
	}
	var regs []metric.Registration
	for _, src := range caches {
		reg, err := m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
			m.observe(o, src)
			return nil
		}, insts...)
		if err != nil {
			for _, r := range regs {
				_ = r.Unregister()
			}
			return err
		}
		regs = append(regs, reg)
	}
	for _, src := range caches {
		m.names[src.Name()] = true
		m.sets.Store(src.Name(), metric.WithAttributes(m.attrsFor(src.Name())...))
	}
	m.regs = append(m.regs, regs...)
	return nil
}

// set is the attribute set of cache's measurements.
func (m *Metrics) set(cache string) metric.MeasurementOption {
	if s, ok := m.sets.Load(cache); ok {
		return s.(metric.MeasurementOption)
	}
	s, _ := m.sets.LoadOrStore(cache, metric.WithAttributes(m.attrsFor(cache)...))
	return s.(metric.MeasurementOption)
}

func (m *Metrics) attrsFor(cache string, more ...attribute.KeyValue) []attribute.KeyValue {
	a := append([]attribute.KeyValue{attribute.String("cacheaside.cache", cache)}, m.attrs...)
	return append(a, more...)
}

// observe reads src's Stats once and reports every instrument.
func (m *Metrics) observe(o metric.Observer, src Source) {
	s := src.Stats()
	name := src.Name()
	with := func(k, v string) metric.ObserveOption {
		return metric.WithAttributes(m.attrsFor(name, attribute.String(k, v))...)
	}
	o.ObserveInt64(m.reqs, int64(s.Hits), with("cacheaside.result", "hit"))
	o.ObserveInt64(m.reqs, int64(s.NegativeHits), with("cacheaside.result", "negative_hit"))
	o.ObserveInt64(m.reqs, int64(s.Misses), with("cacheaside.result", "miss"))
	o.ObserveInt64(m.loads, int64(s.Loads), with("cacheaside.result", "ok"))
	o.ObserveInt64(m.loads, int64(s.LoadErrors), with("cacheaside.result", "error"))
	set := m.set(name)
	for i, st := range stats {
		o.ObserveInt64(m.counts[i], int64(st.value(&s)), set)
	}
	o.ObserveInt64(m.pending, int64(s.PendingInvals), set)
	for _, state := range []string{"closed", "open", "half-open"} {
		o.ObserveInt64(m.gauges["cacheaside.breaker.state"], b2i(s.Breaker == state), with("state", state))
	}
	o.ObserveInt64(m.gauges["cacheaside.local.live"], b2i(s.LocalLive), set)
	o.ObserveInt64(m.gauges["cacheaside.local.entries"], int64(s.LocalEntries), set)
}

func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// Load records a loader call's duration (the cacheaside.Recorder method;
// the others do nothing).
func (m *Metrics) Load(cache string, d time.Duration, err error) {
	m.loadTime.Record(context.Background(), d.Seconds(), m.set(cache))
}

// Close stops observing every cache added; caches with the same names
// may be added again.
func (m *Metrics) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var err error
	for _, r := range m.regs {
		if e := r.Unregister(); e != nil && err == nil {
			err = e
		}
	}
	m.regs = nil
	m.names = map[string]bool{}
	return err
}
