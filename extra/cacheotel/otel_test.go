package cacheotel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/cachetest"
)

// redisAddr is the real Redis at $CACHEASIDE_REDIS_ADDR, else a miniredis.
func redisAddr(t testing.TB) string {
	if a := os.Getenv("CACHEASIDE_REDIS_ADDR"); a != "" {
		return a
	}
	_, mr := cachetest.Redis(t)
	return mr.Addr()
}

func newClient(t testing.TB, addr string) *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

func prefix() string { return fmt.Sprintf("cacheotel:%d:", time.Now().UnixNano()) }

func attrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	m := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		m[kv.Key] = kv.Value
	}
	return m
}

// Get → Load spans with the right parent, and the loader's own span below.
func TestTraceGetAndLoad(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	rdb := newClient(t, redisAddr(t))
	c, err := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "tasks", Tracer: NewTracer(WithTracerProvider(tp))})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	app := tp.Tracer("app")
	ctx, root := app.Start(context.Background(), "GET /tasks/42")
	key := prefix() + "42"
	defer rdb.Del(context.Background(), key)
	load := func(ctx context.Context) (string, error) {
		_, db := app.Start(ctx, "SELECT task")
		time.Sleep(5 * time.Millisecond)
		db.End()
		return "v", nil
	}
	for range 2 {
		if _, err := c.Get(ctx, key, load); err != nil {
			t.Fatal(err)
		}
	}
	root.End()
	spans := rec.Ended()
	byName := map[string][]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		byName[s.Name()] = append(byName[s.Name()], s)
	}
	gets, loads, dbs := byName["cacheaside.Get"], byName["cacheaside.Load"], byName["SELECT task"]
	if len(gets) != 2 || len(loads) != 1 || len(dbs) != 1 {
		t.Fatalf("spans: %v", byName)
	}
	miss, hit := gets[0], gets[1]
	if miss.Parent().SpanID() != root.SpanContext().SpanID() || loads[0].Parent().SpanID() != miss.SpanContext().SpanID() ||
		dbs[0].Parent().SpanID() != loads[0].SpanContext().SpanID() {
		t.Fatal("want GET /tasks/42 → cacheaside.Get → cacheaside.Load → SELECT task")
	}
	a := attrs(miss)
	if a["cacheaside.cache"].AsString() != "tasks" || a["cacheaside.outcome"].AsString() != "miss" || !a["cacheaside.loaded"].AsBool() || a["cacheaside.waited"].AsBool() {
		t.Fatalf("miss attributes %v", a)
	}
	if _, ok := a["cacheaside.key"]; ok {
		t.Fatal("the raw key is on the span without WithKeys")
	}
	if a := attrs(hit); a["cacheaside.outcome"].AsString() != "hit" || a["cacheaside.loaded"].AsBool() {
		t.Fatalf("hit attributes %v", a)
	}
	if loads[0].EndTime().Sub(loads[0].StartTime()) < 5*time.Millisecond {
		t.Fatal("the load span does not cover the loader")
	}
}

// A GetMany span counts its outcomes; a waiting Get says it waited; keys
// appear only on request; errors and "not found" end as they should.
func TestTraceGetManyWaitAndErrors(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	rdb := newClient(t, redisAddr(t))
	c, err := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "tasks", Tracer: NewTracer(WithTracerProvider(tp), WithKeys(true))})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	p := prefix()
	defer func() {
		keys, _ := rdb.Keys(ctx, p+"*").Result()
		if len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
	}()
	key := func(id int) string { return fmt.Sprint(p, id) }
	_ = c.Set(ctx, key(1), "one")
	_, err = cacheaside.GetMany(ctx, c, []int{1, 2, 3}, key, func(_ context.Context, ids []int) (map[int]string, error) {
		return map[int]string{2: "two"}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Two Gets of one key: one loads, one waits.
	release, started := make(chan struct{}), make(chan struct{})
	slow := func(context.Context) (string, error) { close(started); <-release; return "v", nil }
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = c.Get(ctx, key(9), slow) })
	<-started
	wg.Go(func() { _, _ = c.Get(ctx, key(9), slow) })
	for c.Stats().Coalesced == 0 {
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	_, err = c.Get(ctx, key(10), func(context.Context) (string, error) { return "", errors.New("db down") })
	if err == nil {
		t.Fatal("no error")
	}
	_, _ = c.Get(ctx, key(11), func(context.Context) (string, error) { return "", cacheaside.ErrNotFound })

	var many sdktrace.ReadOnlySpan
	var loaded, waited, failed, notFound int
	for _, s := range rec.Ended() {
		a := attrs(s)
		switch {
		case s.Name() == "cacheaside.GetMany":
			many = s
		case s.Name() != "cacheaside.Get":
		case a["cacheaside.key"].AsString() == key(9) && a["cacheaside.loaded"].AsBool():
			loaded++
		case a["cacheaside.key"].AsString() == key(9) && a["cacheaside.waited"].AsBool():
			waited++
		case a["cacheaside.key"].AsString() == key(10):
			if s.Status().Code == codes.Error && len(s.Events()) > 0 && s.Events()[0].Name == "exception" {
				failed++
			}
		case a["cacheaside.key"].AsString() == key(11):
			if s.Status().Code != codes.Error {
				notFound++
			}
		}
	}
	if many == nil {
		t.Fatal("no GetMany span")
	}
	if a := attrs(many); a["cacheaside.keys"].AsInt64() != 3 || a["cacheaside.hits"].AsInt64() != 1 || a["cacheaside.misses"].AsInt64() != 2 || !a["cacheaside.loaded"].AsBool() {
		t.Fatalf("GetMany attributes %v", a)
	}
	if loaded != 1 || waited != 1 || failed != 1 || notFound != 1 {
		t.Fatalf("loaded %d, waited %d, failed %d, not found %d; want 1 each", loaded, waited, failed, notFound)
	}
}

// Redis failures and breaker skips are span events.
func TestTraceRedisEvents(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	mr := miniredis.RunT(t)
	rdb := newClient(t, mr.Addr())
	c, err := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "tasks", Tracer: NewTracer(WithTracerProvider(tp)),
		Degradation: cacheaside.Degradation{BreakerFailures: 1, BreakerCooldown: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	mr.Close()
	ctx := context.Background()
	for range 2 {
		if _, err := c.Get(ctx, "k", func(context.Context) (string, error) { return "v", nil }); err != nil {
			t.Fatal(err)
		}
	}
	var names []string
	for _, s := range rec.Ended() {
		if s.Name() != "cacheaside.Get" {
			continue
		}
		for _, e := range s.Events() {
			names = append(names, e.Name)
			for _, kv := range e.Attributes {
				if kv.Key == "cacheaside.op" && kv.Value.AsString() != "get" {
					t.Fatalf("event %v", e)
				}
			}
		}
	}
	if fmt.Sprint(names) != "[cacheaside.redis_error cacheaside.redis_skipped]" {
		t.Fatalf("events %v", names)
	}
}

// Metrics: every instrument is reported for every cache, from Stats, and
// the histogram holds the loads.
func TestMetrics(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	m, err := NewMetrics(WithMeterProvider(mp))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	rdb := newClient(t, redisAddr(t))
	c, err := cacheaside.New(rdb, &cacheaside.Options[string]{Name: "tasks", Recorder: m})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := m.Add(c); err != nil {
		t.Fatal(err)
	}
	if err := m.Add(c); err == nil {
		t.Fatal("the same name twice")
	}
	ctx := context.Background()
	key := prefix() + "k"
	defer rdb.Del(ctx, key)
	for range 3 {
		_, _ = c.Get(ctx, key, func(context.Context) (string, error) { return "v", nil })
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		t.Fatal(err)
	}
	got := map[string]metricdata.Aggregation{}
	for _, sm := range rm.ScopeMetrics {
		for _, mt := range sm.Metrics {
			got[mt.Name] = mt.Data
		}
	}
	for _, k := range (cacheaside.Stats{}).Counters() {
		if got["cacheaside."+k.Name] == nil {
			t.Errorf("no cacheaside.%s", k.Name)
		}
	}
	for _, n := range []string{"cacheaside.requests", "cacheaside.loads", "cacheaside.load.duration", "cacheaside.invalidations.pending", "cacheaside.breaker.state", "cacheaside.local.live", "cacheaside.local.entries", "cacheaside.read.budget"} {
		if got[n] == nil {
			t.Errorf("no %s", n)
		}
	}
	reqs := got["cacheaside.requests"].(metricdata.Sum[int64])
	byResult := map[string]int64{}
	for _, dp := range reqs.DataPoints {
		r, _ := dp.Attributes.Value("cacheaside.result")
		cache, _ := dp.Attributes.Value("cacheaside.cache")
		if cache.AsString() != "tasks" {
			t.Fatalf("point %v", dp.Attributes)
		}
		byResult[r.AsString()] = dp.Value
	}
	if byResult["hit"] != 2 || byResult["miss"] != 1 || !reqs.IsMonotonic {
		t.Fatalf("requests %v", byResult)
	}
	h := got["cacheaside.load.duration"].(metricdata.Histogram[float64])
	if len(h.DataPoints) != 1 || h.DataPoints[0].Count != 1 || h.DataPoints[0].Bounds[0] != 0.001 {
		t.Fatalf("histogram %+v", h.DataPoints)
	}
	br := got["cacheaside.breaker.state"].(metricdata.Gauge[int64])
	for _, dp := range br.DataPoints {
		st, _ := dp.Attributes.Value("state")
		if (st.AsString() == "closed") != (dp.Value == 1) {
			t.Fatalf("breaker %v = %d", st, dp.Value)
		}
	}
}

// The span of a call that does not record costs no state.
func TestNonRecordingStartsNothing(t *testing.T) {
	tr := NewTracer(WithTracerProvider(noop.NewTracerProvider()))
	ctx := tr.Start(context.Background(), cacheaside.Call{Kind: "get", Cache: "c", Keys: 1})
	if ctx.Value(stateKey{}) != nil {
		t.Fatal("state for a span that does not record")
	}
	tr.Event(ctx, cacheaside.Event{Kind: "hit"})
	tr.End(ctx, cacheaside.Call{Kind: "get", Cache: "c", Keys: 1}, nil)
}

// The histogram's bounds are the buckets of cacheaside.Stats.LoadsWithin.
func TestLoadBoundsMatch(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	c, err := cacheaside.New[string](rdb, &cacheaside.Options[string]{Name: "bounds"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	got := c.Stats().LoadsWithin
	if len(got) != len(loadBounds) {
		t.Fatalf("%d buckets in Stats, %d here", len(got), len(loadBounds))
	}
	for i, b := range got {
		if b.Le != loadBounds[i] {
			t.Errorf("bucket %d: Stats %v, here %v", i, b.Le, loadBounds[i])
		}
	}
}
