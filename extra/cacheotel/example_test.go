package cacheotel_test

import (
	"context"
	"fmt"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheotel"
)

// A Get that misses is a span with its loader call as a child; the next
// Get of the key is a hit.
func Example() {
	mr := miniredis.NewMiniRedis()
	_ = mr.Start()
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()

	spans := tracetest.NewSpanRecorder() // in production: an OTLP exporter
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	tasks, _ := cacheaside.New(rdb, &cacheaside.Options[string]{
		Name:   "tasks",
		Tracer: cacheotel.NewTracer(cacheotel.WithTracerProvider(tp)),
	})
	defer tasks.Close()

	ctx := context.Background()
	for range 2 {
		_, _ = tasks.Get(ctx, "v1:tasks:42", func(context.Context) (string, error) { return "write the docs", nil })
	}
	for _, s := range spans.Ended() {
		line := s.Name()
		for _, kv := range s.Attributes() {
			if kv.Key == "cacheaside.outcome" {
				line += " " + kv.Value.AsString()
			}
		}
		fmt.Println(line)
	}
	// Output:
	// cacheaside.Load
	// cacheaside.Get miss
	// cacheaside.Get hit
}
