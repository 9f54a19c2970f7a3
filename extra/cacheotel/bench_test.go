package cacheotel

import (
	"context"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/seed-b4ec662f/cacheaside"
)

// BenchmarkInstrumentation is a Get hit, from Redis and from the local
// tier, with: no instrumentation; metrics only (NewMetrics as Recorder and
// observing Stats); tracing with a no-op TracerProvider; tracing with the
// SDK (always sampled, spans to an in-memory exporter in batches). The
// real Redis at $CACHEASIDE_REDIS_ADDR when set, else a miniredis.
func BenchmarkInstrumentation(b *testing.B) {
	addr := redisAddr(b)
	setups := []struct {
		name  string
		build func(o *cacheaside.Options[string]) func(Source)
	}{
		{"off", func(*cacheaside.Options[string]) func(Source) { return nil }},
		{"metrics", func(o *cacheaside.Options[string]) func(Source) {
			m, err := NewMetrics(WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))))
			if err != nil {
				b.Fatal(err)
			}
			o.Recorder = m
			return func(c Source) { _ = m.Add(c) }
		}},
		{"tracing-noop", func(o *cacheaside.Options[string]) func(Source) {
			o.Tracer = NewTracer(WithTracerProvider(noop.NewTracerProvider()))
			return nil
		}},
		{"tracing-sdk", func(o *cacheaside.Options[string]) func(Source) {
			tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewInMemoryExporter()))
			b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
			o.Tracer = NewTracer(WithTracerProvider(tp))
			return nil
		}},
	}
	for _, tier := range []string{"redis", "local"} {
		for _, s := range setups {
			b.Run(tier+"/"+s.name, func(b *testing.B) {
				rdb := newClient(b, addr)
				o := &cacheaside.Options[string]{Name: "bench"}
				key := prefix() + "k"
				if tier == "local" {
					o.Local = &cacheaside.LocalOptions{TTL: time.Hour, Channel: key + ":bus"}
				}
				add := s.build(o)
				c, err := cacheaside.New(rdb, o)
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				defer rdb.Del(context.Background(), key)
				if add != nil {
					add(c)
				}
				ctx := context.Background()
				if tier == "local" {
					if err := c.WaitLocal(ctx); err != nil {
						b.Fatal(err)
					}
				}
				load := func(context.Context) (string, error) { return "v", nil }
				if _, err := c.Get(ctx, key, load); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				for b.Loop() {
					if _, err := c.Get(ctx, key, load); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
