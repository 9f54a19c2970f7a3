// Package cacheotel instruments cacheaside caches with OpenTelemetry:
// spans for Get, GetMany and loader calls, and metrics from Stats.
//
// # Tracing
//
// NewTracer returns a cacheaside.Tracer; give it to each cache:
//
//	tracer := cacheotel.NewTracer() // the global TracerProvider, or WithTracerProvider
//	tasks, _ := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "tasks", Tracer: tracer})
//
// Each Get is a span named "cacheaside.Get" (a GetMany "cacheaside.GetMany")
// in the caller's trace, with these attributes:
//
//   - cacheaside.cache: the cache's Options.Name;
//   - cacheaside.outcome: what the first read found, as Stats counts it:
//     "hit" (a value in Redis), "local" (a value in the local tier),
//     "stale" (a value past its TTL, served while it is refreshed),
//     "negative" (a "not found" tombstone) or "miss";
//   - cacheaside.loaded: this call ran the loader; cacheaside.waited: it
//     waited for a load another caller ran (in this process or, through
//     the Redis lease, in another); cacheaside.served_stale: a miss that
//     was answered with a value past its TTL the lease round found;
//   - for a GetMany, cacheaside.keys (the ids asked for) and the count of
//     each first-read outcome (cacheaside.hits, cacheaside.local_hits,
//     cacheaside.stale_hits, cacheaside.negative_hits, cacheaside.misses;
//     they add up to the distinct keys) and cacheaside.served_stale;
//   - cacheaside.key, the raw key, only with WithKeys(true): keys often
//     hold ids that should not leave the process.
//
// A loader call is a child span, "cacheaside.Load", so a slow database
// shows under the cache, and the loader's own spans (from its context)
// nest below it. The loader call of a background refresh is a
// "cacheaside.Load" span too, with cacheaside.background=true, under the
// Get that started it (which may have ended). A load is shared by every
// caller that joined it, so its events go to the span of the caller that
// leads it. Redis failures are span events: "cacheaside.redis_error"
// for a command that failed, "cacheaside.redis_skipped" for one the open
// circuit breaker did not send, with the step (cacheaside.op: "get",
// "acquire", "fill", ...) and the error. Waits for another process's lease
// ("cacheaside.lease_wait"), answers from stale-if-error and refusals with
// ErrOverloaded are events too. A Get that returns an error other than
// ErrNotFound ends with status Error and the error recorded.
//
// The cost: with a tracer that does not record (the global provider when
// none is installed, or a no-op one), a Get hit costs the one context
// allocation of the tracer's Start; with no Tracer set, nothing. The
// module's BenchmarkInstrumentation measures both tiers.
//
// # Metrics
//
// NewMetrics registers observable instruments that read Cache.Stats of the
// caches added to it at each collection, and a load-duration histogram fed
// by its Recorder:
//
//	m, _ := cacheotel.NewMetrics() // the global MeterProvider, or WithMeterProvider
//	tasks, _ := cacheaside.New[Task](rdb, &cacheaside.Options[Task]{Name: "tasks", Recorder: m})
//	_ = m.Add(tasks)
//
// See NewMetrics for the instruments.
//
// The module is separate from the cacheaside module, as go-redis keeps
// redisotel under extra/, so a cache without OpenTelemetry does not depend
// on it.
package cacheotel

import (
	"context"
	"errors"
	"sync"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/seed-b4ec662f/cacheaside"
)

// ScopeName is the instrumentation scope of the tracer and the meter.
const ScopeName = "github.com/seed-b4ec662f/cacheaside/extra/cacheotel"

// Option configures NewTracer and NewMetrics.
type Option func(*config)

type config struct {
	tp       trace.TracerProvider
	mp       meterProvider
	withKeys bool
	attrs    []attribute.KeyValue
}

// WithTracerProvider sets the TracerProvider (default: otel's global one).
func WithTracerProvider(tp trace.TracerProvider) Option { return func(c *config) { c.tp = tp } }

// WithKeys puts each Get's raw key on its span as cacheaside.key (and a
// one-key load's on its span). Off by default: keys often hold ids.
func WithKeys(on bool) Option { return func(c *config) { c.withKeys = on } }

// WithAttributes adds attributes to every span and every metric point.
func WithAttributes(attrs ...attribute.KeyValue) Option {
	return func(c *config) { c.attrs = append(c.attrs, attrs...) }
}

func newConfig(opts []Option) *config {
	c := &config{}
	for _, o := range opts {
		o(c)
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	return c
}

// Tracer is a cacheaside.Tracer that makes OpenTelemetry spans.
type Tracer struct {
	tracer   trace.Tracer
	withKeys bool
	attrs    []attribute.KeyValue
	start    []trace.SpanStartOption // built once: passing them costs nothing per call
}

var _ cacheaside.Tracer = (*Tracer)(nil)

// NewTracer returns a Tracer for Options.Tracer. One Tracer may serve any
// number of caches.
func NewTracer(opts ...Option) *Tracer {
	c := newConfig(opts)
	return &Tracer{
		tracer:   c.tp.Tracer(ScopeName),
		withKeys: c.withKeys,
		attrs:    c.attrs,
		start:    []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindInternal)},
	}
}

// The kinds of cacheaside.Call.
const (
	callGet     = "get"
	callGetMany = "getmany"
	callLoad    = "load"
)

var spanNames = map[string]string{
	callGet:     "cacheaside.Get",
	callGetMany: "cacheaside.GetMany",
	callLoad:    "cacheaside.Load",
}

func spanName(k string) string {
	if n, ok := spanNames[k]; ok {
		return n
	}
	return "cacheaside." + k
}

// stateKey holds a recording span's *callState in its context.
type stateKey struct{}

// callState gathers what a recording call's events said, for End.
type callState struct {
	mu      sync.Mutex
	span    trace.Span
	id      trace.SpanID
	kind    string // cacheaside.Call.Kind
	outcome string
	counts  map[string]int64 // GetMany: per outcome
	loaded  bool
	waited  bool
	stale   int64 // served_stale events
	ended   bool
}

// stateOf returns the state of the recording call ctx belongs to: nil
// when its own span does not record (a nested call of a cache whose
// tracer does not record must not write into the outer call's state).
func stateOf(ctx context.Context) *callState {
	st, _ := ctx.Value(stateKey{}).(*callState)
	if st == nil {
		return nil
	}
	// A no-op tracer's span carries its parent's span context: only a
	// recording span with this state's id is this state's.
	if sp := trace.SpanFromContext(ctx); !sp.IsRecording() || sp.SpanContext().SpanID() != st.id {
		return nil
	}
	return st
}

// Start begins the call's span. Only a recording span gets attributes and
// a state of its own; a non-recording one costs the tracer's Start alone.
func (t *Tracer) Start(ctx context.Context, call cacheaside.Call) context.Context {
	parent := stateOf(ctx)
	ctx, span := t.tracer.Start(ctx, spanName(call.Kind), t.start...)
	if !span.IsRecording() {
		return ctx
	}
	if call.Background {
		span.SetAttributes(attribute.Bool("cacheaside.background", true))
	} else if call.Kind == callLoad && parent != nil {
		parent.mu.Lock()
		if !parent.ended {
			parent.loaded = true
		}
		parent.mu.Unlock()
	}
	span.SetAttributes(attribute.String("cacheaside.cache", call.Cache))
	if len(t.attrs) > 0 {
		span.SetAttributes(t.attrs...)
	}
	if call.Kind != callGet {
		span.SetAttributes(attribute.Int("cacheaside.keys", call.Keys))
	}
	if t.withKeys && call.Key != "" {
		span.SetAttributes(attribute.String("cacheaside.key", call.Key))
	}
	st := &callState{span: span, id: span.SpanContext().SpanID(), kind: call.Kind}
	if call.Kind == callGetMany {
		st.counts = map[string]int64{}
	}
	return context.WithValue(ctx, stateKey{}, st)
}

// outcomes maps first-read events to cacheaside.outcome.
var outcomes = map[string]string{
	"hit":                "hit",
	"local_hit":          "local",
	"stale":              "stale",
	"negative_hit":       "negative",
	"local_negative_hit": "negative",
	"miss":               "miss",
}

// countNames are a GetMany's per-outcome count attributes.
var countNames = map[string]string{
	"hit": "cacheaside.hits", "local": "cacheaside.local_hits", "stale": "cacheaside.stale_hits",
	"negative": "cacheaside.negative_hits", "miss": "cacheaside.misses",
}

// Event adds what happened to the span of the call ctx belongs to.
func (t *Tracer) Event(ctx context.Context, ev cacheaside.Event) {
	st := stateOf(ctx)
	if st == nil {
		return
	}
	switch ev.Kind {
	case "redis_error", "redis_skipped":
		attrs := []attribute.KeyValue{attribute.String("cacheaside.op", ev.Op)}
		if ev.Err != nil {
			attrs = append(attrs, attribute.String("cacheaside.error", ev.Err.Error()))
		}
		st.span.AddEvent("cacheaside."+ev.Kind, trace.WithAttributes(attrs...))
		return
	case "lease_wait":
		st.span.AddEvent("cacheaside.lease_wait", trace.WithAttributes(attribute.Int("cacheaside.keys", ev.N)))
	case "stale_if_error", "overloaded":
		st.span.AddEvent("cacheaside." + ev.Kind)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.ended {
		return
	}
	switch ev.Kind {
	case "coalesced", "lease_wait":
		st.waited = true
	case "served_stale":
		st.stale++
	}
	o, first := outcomes[ev.Kind]
	switch {
	case !first:
	case st.counts != nil:
		st.counts[o]++
	case st.outcome == "":
		st.outcome = o
	}
}

// End sets the call's gathered attributes and ends its span.
func (t *Tracer) End(ctx context.Context, call cacheaside.Call, err error) {
	span := trace.SpanFromContext(ctx)
	if st := stateOf(ctx); st != nil {
		st.mu.Lock()
		st.ended = true
		if st.outcome != "" {
			span.SetAttributes(attribute.String("cacheaside.outcome", st.outcome))
		}
		for o, n := range st.counts {
			span.SetAttributes(attribute.Int64(countNames[o], n))
		}
		if st.kind != callLoad {
			span.SetAttributes(attribute.Bool("cacheaside.loaded", st.loaded), attribute.Bool("cacheaside.waited", st.waited))
		}
		switch {
		case st.kind == callGetMany:
			span.SetAttributes(attribute.Int64("cacheaside.served_stale", st.stale))
		case st.stale > 0:
			span.SetAttributes(attribute.Bool("cacheaside.served_stale", true))
		}
		st.mu.Unlock()
		if err != nil && !errors.Is(err, cacheaside.ErrNotFound) {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		}
	}
	span.End()
}
