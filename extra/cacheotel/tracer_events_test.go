package cacheotel

// These drive the Tracer with the event sequences the core emits (the
// root module's trace_more_test.go shows them happening for real).

import (
	"context"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/seed-b4ec662f/cacheaside"
)

func sdkTracer(t *testing.T) (*Tracer, *tracetest.SpanRecorder) {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	return NewTracer(WithTracerProvider(tp)), sr
}

// One GetMany key that misses and is answered stale by the lease round
// (core events: miss, then served_stale) is counted once, as a miss.
func TestGetManyCountsEachKeyOnce(t *testing.T) {
	tr, sr := sdkTracer(t)
	call := cacheaside.Call{Kind: "getmany", Cache: "c", Keys: 1}
	ctx := tr.Start(context.Background(), call)
	tr.Event(ctx, cacheaside.Event{Kind: "miss"})
	tr.Event(ctx, cacheaside.Event{Kind: "served_stale"}) // missRun.answered → staleServed(r.ctx)
	tr.End(ctx, call, nil)
	a := attrs(sr.Ended()[0])
	misses, stale := a["cacheaside.misses"].AsInt64(), a["cacheaside.stale_hits"].AsInt64()
	if misses != 1 || stale != 0 || a["cacheaside.served_stale"].AsInt64() != 1 {
		t.Errorf("misses=%d stale_hits=%d served_stale=%d; want 1, 0, 1", misses, stale, a["cacheaside.served_stale"].AsInt64())
	}
}

// A background refresh's loader call starts from the Get's context, maybe
// before the Get's End (it runs on its own goroutine, racing End): the Get
// span still says cacheaside.loaded=false, and the load is marked
// background.
func TestBackgroundLoadIsNotTheGets(t *testing.T) {
	tr, sr := sdkTracer(t)
	get := cacheaside.Call{Kind: "get", Cache: "c", Key: "k", Keys: 1}
	ctx := tr.Start(context.Background(), get)
	tr.Event(ctx, cacheaside.Event{Kind: "stale"})
	load := cacheaside.Call{Kind: "load", Cache: "c", Key: "k", Keys: 1, Background: true}
	lctx := tr.Start(ctx, load) // refreshAsync's goroutine, before the Get returned
	tr.End(ctx, get, nil)
	tr.End(lctx, load, nil)
	for _, s := range sr.Ended() {
		if s.Name() == "cacheaside.Get" && attrs(s)["cacheaside.loaded"].AsBool() {
			t.Errorf("stale hit whose background refresh began before End: cacheaside.loaded=true, outcome=%s", attrs(s)["cacheaside.outcome"].AsString())
		}
		if s.Name() == "cacheaside.Load" && !attrs(s)["cacheaside.background"].AsBool() {
			t.Error("the refresh's load span is not marked background")
		}
	}
}

// A Get of a cache whose Tracer does not record (another provider, or a
// sampler saying no), nested inside a recording call (a loader that reads
// another cache), leaves the outer call's span alone.
func TestNonRecordingInnerCallStaysOut(t *testing.T) {
	outer, sr := sdkTracer(t)
	inner := NewTracer(WithTracerProvider(noop.NewTracerProvider()))
	load := cacheaside.Call{Kind: "load", Cache: "a", Keys: 1}
	lctx := outer.Start(context.Background(), load)
	get := cacheaside.Call{Kind: "get", Cache: "b", Key: "x", Keys: 1}
	gctx := inner.Start(lctx, get)
	inner.Event(gctx, cacheaside.Event{Kind: "hit"})
	inner.End(gctx, get, nil)
	outer.End(lctx, load, nil)
	if o, ok := attrs(sr.Ended()[0])["cacheaside.outcome"]; ok {
		t.Errorf("the outer Load span got the inner Get's outcome %q", o.AsString())
	}
}
