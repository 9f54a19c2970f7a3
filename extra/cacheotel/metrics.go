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

// loadBounds are the bucket bounds of cacheaside.Stats.LoadsWithin, which
// the histogram uses too (TestLoadBoundsMatch checks them against a
// cache's Stats).
var loadBounds = []time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second,
	10 * time.Second, 30 * time.Second,
}

// WithMeterProvider sets the MeterProvider (default: otel's global one).
func WithMeterProvider(mp metric.MeterProvider) Option { return func(c *config) { c.mp = mp } }

// Source is a cache Metrics reads: any *cacheaside.Cache[T].
type Source interface {
	Name() string
	Stats() cacheaside.Stats
}

// Metrics exports caches' Stats through the OpenTelemetry metric API, and
// is the cacheaside.Recorder that feeds the load-duration histogram.
type Metrics struct {
	meter    metric.Meter
	attrs    []attribute.KeyValue
	loadTime metric.Float64Histogram

	sets sync.Map // cache name → metric.MeasurementOption, its attribute set, built once (read by Load without a lock)

	mu      sync.Mutex // protects names and regs
	names   map[string]bool
	regs    []metric.Registration
	counts  map[string]metric.Int64ObservableCounter // by cacheaside.Counter.Name
	gauges  map[string]metric.Int64ObservableGauge
	pending metric.Int64ObservableUpDownCounter
	budget  metric.Float64ObservableGauge
}

// NewMetrics creates the instruments on the meter of the MeterProvider
// (otel's global one unless WithMeterProvider says otherwise):
//
//   - one observable counter per counter cacheaside.Stats.Counters lists,
//     named cacheaside.<name>: cacheaside.requests{cacheaside.cache,
//     cacheaside.result}, Gets by the outcome of the first read, result
//     "hit", "negative_hit" or "miss" (a GetMany counts once per distinct
//     key); cacheaside.loads{cacheaside.result "ok" or "error"}, loader
//     calls; cacheaside.coalesced, cacheaside.redis.errors,
//     cacheaside.redis.skipped and the rest. A counter added to cacheaside
//     reaches OpenTelemetry without a change here;
//   - cacheaside.load.duration (s): a histogram of loader calls, recorded
//     by Metrics as the caches' Recorder (Options.Recorder: m);
//   - cacheaside.invalidations.pending (an up-down counter),
//     cacheaside.breaker.state{state} (1 for the current state of
//     "closed", "open" and "half-open"), cacheaside.local.live (0 or 1),
//     cacheaside.local.entries and cacheaside.read.budget (s: the budget a
//     Redis read gets now, which follows Redis's latency) (gauges).
//
// The observable instruments read Stats once per cache per collection, so
// they cost the request path nothing.
func NewMetrics(opts ...Option) (*Metrics, error) {
	c := newConfig(opts)
	m := &Metrics{meter: c.mp.Meter(ScopeName), attrs: c.attrs, names: map[string]bool{}, gauges: map[string]metric.Int64ObservableGauge{},
		counts: map[string]metric.Int64ObservableCounter{}}
	var err error
	bounds := make([]float64, len(loadBounds))
	for i, d := range loadBounds {
		bounds[i] = d.Seconds()
	}
	if m.loadTime, err = m.meter.Float64Histogram("cacheaside.load.duration", metric.WithUnit("s"),
		metric.WithDescription("Time spent in each loader call."), metric.WithExplicitBucketBoundaries(bounds...)); err != nil {
		return nil, err
	}
	if m.pending, err = m.meter.Int64ObservableUpDownCounter("cacheaside.invalidations.pending", metric.WithUnit("{invalidation}"),
		metric.WithDescription("Failed invalidations still waiting for a retry.")); err != nil {
		return nil, err
	}
	if m.budget, err = m.meter.Float64ObservableGauge("cacheaside.read.budget", metric.WithUnit("s"),
		metric.WithDescription("The budget a Redis read gets now: Degradation.OpTimeout, or more while Redis answers slowly (up to MaxOpTimeout).")); err != nil {
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
	for _, k := range (cacheaside.Stats{}).Counters() {
		if _, ok := m.counts[k.Name]; ok {
			continue // another member of a family
		}
		ctr, err := m.meter.Int64ObservableCounter("cacheaside."+k.Name, metric.WithUnit(k.Unit), metric.WithDescription(k.Help))
		if err != nil {
			return nil, err
		}
		m.counts[k.Name] = ctr
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
	insts := []metric.Observable{m.pending, m.budget}
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
	set := m.set(name)
	for _, k := range s.Counters() {
		if k.Result != "" {
			o.ObserveInt64(m.counts[k.Name], int64(k.Value), with("cacheaside.result", k.Result))
		} else {
			o.ObserveInt64(m.counts[k.Name], int64(k.Value), set)
		}
	}
	o.ObserveInt64(m.pending, int64(s.PendingInvals), set)
	o.ObserveFloat64(m.budget, s.ReadBudget.Seconds(), set)
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

// Record is the cacheaside.Recorder method: it records each loader call's
// duration in the histogram; other events are counted in Stats, which the
// observable counters read.
func (m *Metrics) Record(_ context.Context, ev cacheaside.Event) {
	if ev.Kind == "load" {
		m.loadTime.Record(context.Background(), ev.D.Seconds(), m.set(ev.Cache))
	}
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
