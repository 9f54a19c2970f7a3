package cacheaside

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// spanKey holds a recTracer span's id in a context.
type spanKey struct{}

// recSpan is one call a recTracer saw.
type recSpan struct {
	id, parent int
	call       Call
	events     []Event
	err        error
	ended      bool
}

// recTracer records every Tracer call, checking that Event and End get the
// context Start returned (or one derived from it).
type recTracer struct {
	mu    sync.Mutex
	spans []*recSpan
	stray []Event // events with no span in their context
}

func (r *recTracer) Start(ctx context.Context, call Call) context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	parent, _ := ctx.Value(spanKey{}).(int)
	s := &recSpan{id: len(r.spans) + 1, parent: parent, call: call}
	r.spans = append(r.spans, s)
	return context.WithValue(ctx, spanKey{}, s.id)
}

func (r *recTracer) Event(ctx context.Context, ev Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	id, ok := ctx.Value(spanKey{}).(int)
	if !ok {
		r.stray = append(r.stray, ev)
		return
	}
	r.spans[id-1].events = append(r.spans[id-1].events, ev)
}

func (r *recTracer) End(ctx context.Context, call Call, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := ctx.Value(spanKey{}).(int)
	s := r.spans[id-1]
	if s.call != call || s.ended {
		panic(fmt.Sprintf("End(%+v) of span %+v", call, s))
	}
	s.ended, s.err = true, err
}

// take returns the spans recorded so far and forgets them.
func (r *recTracer) take() []*recSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.spans
	r.spans = nil
	return s
}

func kinds(evs []Event) string {
	var s []string
	for _, e := range evs {
		s = append(s, e.Kind)
	}
	return strings.Join(s, ",")
}

// Each Get is one span whose events say what happened; a load is a child
// span of the Get that ran it.
func TestTracerGet(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := &recTracer{}
		c := newCache(t, b, &Options[string]{Tracer: tr})
		ctx := context.Background()
		key := b.key("k")
		var n counter
		if _, err := c.Get(ctx, key, n.load("v", 0)); err != nil {
			t.Fatal(err)
		}
		spans := tr.take()
		if len(spans) != 2 {
			t.Fatalf("miss: %d spans, want the Get and its load", len(spans))
		}
		get, load := spans[0], spans[1]
		if get.call != (Call{Kind: callGet, Cache: "default", Key: key, Keys: 1}) || !get.ended || get.err != nil || get.parent != 0 {
			t.Fatalf("get span %+v", get)
		}
		if kinds(get.events) != "miss" {
			t.Fatalf("get events %s, want miss", kinds(get.events))
		}
		if load.call != (Call{Kind: callLoad, Cache: "default", Key: key, Keys: 1}) || load.parent != get.id || !load.ended {
			t.Fatalf("load span %+v, want a child of the get (id %d)", load, get.id)
		}

		if _, err := c.Get(ctx, key, n.load("v", 0)); err != nil {
			t.Fatal(err)
		}
		spans = tr.take()
		if len(spans) != 1 || kinds(spans[0].events) != "hit" || !spans[0].ended {
			t.Fatalf("hit: spans %+v", spans)
		}

		missing := b.key("missing")
		nf := func(context.Context) (string, error) { return "", ErrNotFound }
		for range 2 {
			_, _ = c.Get(ctx, missing, nf)
		}
		spans = tr.take()
		if len(spans) != 3 || kinds(spans[0].events) != "miss" || kinds(spans[2].events) != "negative_hit" || !errors.Is(spans[2].err, ErrNotFound) {
			t.Fatalf("not found: spans %+v", spans)
		}
		if len(tr.stray) != 0 {
			t.Fatalf("events outside any call: %v", tr.stray)
		}
	})
}

// A GetMany is one span with an event per key and one load span for the
// misses; a Get that shares another's load says so.
func TestTracerGetManyAndCoalesced(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := &recTracer{}
		c := newCache(t, b, &Options[string]{Tracer: tr})
		ctx := context.Background()
		key := func(id int) string { return b.key(fmt.Sprint("item:", id)) }
		if err := c.Set(ctx, key(1), "one"); err != nil {
			t.Fatal(err)
		}
		tr.take()
		bl := &batchCounter{}
		if _, err := GetMany(ctx, c, []int{1, 2, 3}, key, bl.load); err != nil {
			t.Fatal(err)
		}
		spans := tr.take()
		if len(spans) != 2 || spans[0].call.Kind != callGetMany || spans[0].call.Keys != 3 || spans[0].call.Key != "" {
			t.Fatalf("spans %+v", spans)
		}
		ev := strings.Split(kinds(spans[0].events), ",")
		slices.Sort(ev)
		if strings.Join(ev, ",") != "hit,miss,miss" {
			t.Fatalf("getmany events %v", ev)
		}
		if l := spans[1]; l.call.Kind != callLoad || l.call.Keys != 2 || l.call.Key != "" || l.parent != spans[0].id {
			t.Fatalf("load span %+v", l)
		}

		// Two Gets of one key at once: one loads, the other joins.
		release := make(chan struct{})
		started := make(chan struct{})
		slow := func(context.Context) (string, error) { close(started); <-release; return "v", nil }
		var wg sync.WaitGroup
		wg.Go(func() { _, _ = c.Get(ctx, key(9), slow) })
		<-started
		wg.Go(func() { _, _ = c.Get(ctx, key(9), slow) })
		waitFor(t, "the second Get to join", func() bool { return c.Stats().Coalesced == 1 })
		close(release)
		wg.Wait()
		var loaded, joined int
		for _, s := range tr.take() {
			switch {
			case s.call.Kind == callLoad:
				loaded++
			case kinds(s.events) == "miss,coalesced":
				joined++
			}
		}
		if loaded != 1 || joined != 1 {
			t.Fatalf("%d loads, %d joined Gets; want 1 each", loaded, joined)
		}
	})
}

// Redis failures reach the Get's span as events: a failed command as
// redis_error, a command the open breaker did not send as redis_skipped.
// Stats counts them apart too.
func TestTracerRedisEvents(t *testing.T) {
	tr := &recTracer{}
	rdb := redis.NewClient(&redis.Options{Addr: closedAddr(t), ContextTimeoutEnabled: true, MaxRetries: -1})
	defer rdb.Close()
	c, err := New(rdb, &Options[string]{Tracer: tr, Degradation: Degradation{BreakerFailures: 2, BreakerCooldown: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	var n counter
	for range 4 {
		if v, err := c.Get(ctx, "k", n.load("v", 0)); err != nil || v != "v" {
			t.Fatalf("Get: %q %v", v, err)
		}
	}
	spans := tr.take()
	var got []string
	for _, s := range spans {
		if s.call.Kind == callGet {
			got = append(got, kinds(s.events))
		}
	}
	if got[0] != "miss,redis_error" || got[3] != "miss,redis_skipped" {
		t.Fatalf("events per Get: %q", got)
	}
	for _, s := range spans {
		for _, e := range s.events {
			if (e.Kind == evRedisError || e.Kind == evRedisSkipped) && (e.Op != "get" || e.Err == nil) {
				t.Fatalf("event %+v", e)
			}
			if e.Kind == evRedisSkipped && !errors.Is(e.Err, ErrRedisUnavailable) {
				t.Fatalf("skip event %+v", e)
			}
		}
	}
	s := c.Stats()
	if s.RedisErrors != 2 || s.RedisSkipped != 2 || s.BreakerOpens != 1 {
		t.Fatalf("RedisErrors %d, RedisSkipped %d, BreakerOpens %d; want the 2 failed reads, the 2 skipped, 1 opening", s.RedisErrors, s.RedisSkipped, s.BreakerOpens)
	}
}

// A local-tier answer is its own event.
func TestTracerLocalHit(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		tr := &recTracer{}
		c := localCache(t, b, &Options[string]{Tracer: tr})
		ctx := context.Background()
		var n counter
		for range 2 {
			if _, err := c.Get(ctx, b.key("k"), n.load("v", 0)); err != nil {
				t.Fatal(err)
			}
		}
		spans := tr.take()
		if last := spans[len(spans)-1]; kinds(last.events) != "local_hit" {
			t.Fatalf("second Get's events %s, want local_hit", kinds(last.events))
		}
	})
}

// nopTracer traces nothing and allocates nothing.
type nopTracer struct{}

func (nopTracer) Start(ctx context.Context, _ Call) context.Context { return ctx }
func (nopTracer) Event(context.Context, Event)                      {}
func (nopTracer) End(context.Context, Call, error)                  {}

// valueTracer allocates the one context a real tracer's Start returns.
type valueTracer struct{ nopTracer }

func (valueTracer) Start(ctx context.Context, _ Call) context.Context {
	return context.WithValue(ctx, spanKey{}, 1)
}

// A Tracer costs the hit path nothing of its own: a tracer whose Start
// allocates one context costs one allocation more than no tracer, and one
// that allocates nothing costs none.
func TestTracerHitAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	mr := miniredisRun(t)
	ctx := context.Background()
	allocs := func(tr Tracer) float64 {
		rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
		defer rdb.Close()
		c, err := New(rdb, &Options[string]{Tracer: tr, NoReadCoalescing: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		load := func(context.Context) (string, error) { return "v", nil }
		if _, err := c.Get(ctx, "k", load); err != nil {
			t.Fatal(err)
		}
		return testing.AllocsPerRun(200, func() { _, _ = c.Get(ctx, "k", load) })
	}
	off, nop, one := allocs(nil), allocs(nopTracer{}), allocs(valueTracer{})
	if nop != off || one != off+1 {
		t.Fatalf("allocations per hit: %.1f without a Tracer, %.1f with a no-op one, %.1f with one that allocates a context; want %.0f, %.0f, %.0f",
			off, nop, one, off, off, off+1)
	}
}

// Load times land in cumulative buckets; HitRate leaves "not found" out.
func TestStatsLoadBucketsAndRates(t *testing.T) {
	clk := newFakeClock()
	mr := miniredisRun(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	c, err := New(rdb, &Options[string]{Clock: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	took := func(d time.Duration, v string, err error) Loader[string] {
		return func(context.Context) (string, error) { clk.Advance(d); return v, err }
	}
	_, _ = c.Get(ctx, "a", took(30*time.Millisecond, "a", nil))
	_, _ = c.Get(ctx, "b", took(2*time.Second, "", errors.New("db down")))
	_, _ = c.Get(ctx, "c", took(time.Minute, "c", nil))
	_, _ = c.Get(ctx, "d", took(0, "", ErrNotFound))
	_, _ = c.Get(ctx, "a", took(0, "x", nil))
	_, _ = c.Get(ctx, "d", took(0, "", ErrNotFound))
	s := c.Stats()
	want := map[time.Duration]uint64{time.Millisecond: 1, 25 * time.Millisecond: 1, 50 * time.Millisecond: 2, time.Second: 2, 2500 * time.Millisecond: 3, 30 * time.Second: 3}
	if len(s.LoadsWithin) != numLoadBuckets {
		t.Fatalf("%d load buckets", len(s.LoadsWithin))
	}
	for _, b := range s.LoadsWithin {
		if w, ok := want[b.Le]; ok && b.Count != w {
			t.Fatalf("LoadsWithin[%v] = %d, want %d (all: %v)", b.Le, b.Count, w, s.LoadsWithin)
		}
	}
	if s.Loads+s.LoadErrors != 4 {
		t.Fatalf("%d loads", s.Loads+s.LoadErrors)
	}
	if s.requests() != 6 || s.HitRate() != 1.0/6 || s.NegativeHitRate() != 1.0/6 {
		t.Fatalf("requests %d, HitRate %v, NegativeHitRate %v; want 6, 1/6, 1/6", s.requests(), s.HitRate(), s.NegativeHitRate())
	}
	if (Stats{}).HitRate() != 0 || (Stats{}).NegativeHitRate() != 0 {
		t.Fatal("rates before any Get")
	}
}

// A configuration warning reaches slog.Default when the cache has no
// Logger, and only the cache's Logger when it has one.
func TestConfigWarningVisibleByDefault(t *testing.T) {
	var def, own bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&def, nil)))
	defer slog.SetDefault(old)
	mr := miniredisRun(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()}) // ContextTimeoutEnabled off
	defer rdb.Close()
	c, err := New(rdb, &Options[string]{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if !strings.Contains(def.String(), "ContextTimeoutEnabled is false") {
		t.Fatalf("slog.Default got %q", def.String())
	}
	def.Reset()
	c, err = New(rdb, &Options[string]{Logger: slog.New(slog.NewTextHandler(&own, nil))})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if def.Len() != 0 || !strings.Contains(own.String(), "ContextTimeoutEnabled is false") {
		t.Fatalf("with a Logger: default got %q, own got %q", def.String(), own.String())
	}
}

// WaitLocal returns once the bus is confirmed; LocalLive says so.
func TestWaitLocal(t *testing.T) {
	mr := miniredisRun(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := New(rdb, &Options[string]{Local: &LocalOptions{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WaitLocal(ctx); err != nil || !c.local.live.Load() {
		t.Fatalf("WaitLocal: %v, LocalLive %v", err, c.local.live.Load())
	}
	c.Close()
	if c.local.live.Load() || !errors.Is(c.WaitLocal(ctx), ErrClosed) {
		t.Fatalf("after Close: LocalLive %v, WaitLocal %v", c.local.live.Load(), c.WaitLocal(ctx))
	}
	plain, err := New(rdb, &Options[string]{})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if plain.Stats().LocalLive || !errors.Is(plain.WaitLocal(ctx), ErrInvalidOptions) {
		t.Fatal("a cache without a local tier")
	}
	mr.Close() // the bus is gone: WaitLocal waits on ctx
	lost, err := New(rdb, &Options[string]{Local: &LocalOptions{}})
	if err != nil {
		t.Fatal(err)
	}
	defer lost.Close()
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelShort()
	if err := lost.WaitLocal(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitLocal with no bus: %v", err)
	}
}

// TestCountersCoverStats: Stats.Counters lists every counter of Stats
// once, so a counter added to Stats without a row in counterTable (and so
// missing from both metrics adapters) fails here.
func TestCountersCoverStats(t *testing.T) {
	var s Stats
	v := reflect.ValueOf(&s).Elem()
	fields := map[uint64]string{}
	for i := range v.NumField() {
		if f := v.Type().Field(i); f.Type.Kind() == reflect.Uint64 && f.Name != "PendingInvals" && f.Name != "LocalEntries" {
			v.Field(i).SetUint(uint64(1000 + i))
			fields[uint64(1000+i)] = f.Name
		}
	}
	seen := map[string]int{}
	for _, k := range s.Counters() {
		if k.Name == "" || k.Unit == "" || k.Help == "" {
			t.Errorf("counter %+v lacks a name, unit or help", k)
		}
		if f, ok := fields[k.Value]; ok {
			seen[f]++
		} else {
			t.Errorf("counter %s%s reads no Stats field", k.Name, k.Result)
		}
	}
	for _, f := range fields {
		if seen[f] != 1 {
			t.Errorf("Stats.%s is listed %d times by Counters, want once", f, seen[f])
		}
	}
}
