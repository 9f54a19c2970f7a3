package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// A write whose request ends while the UPDATE is in flight still runs to
// the end, invalidation included (writeContext): before, the row could
// commit while the call returned "context canceled" and skipped the
// invalidation, so the cache served the old task for its TTL. The request
// is cancelled at random points of UpdateTask.
func TestCanceledWriteStillInvalidates(t *testing.T) {
	ta := newTestApp(t, nil)
	ctx := context.Background()
	const id = 42
	cur, err := ta.svc.GetTask(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	in := TaskInput{Title: cur.Title, Status: cur.Status, Assignee: cur.Assignee, Tags: cur.Tags}
	t0 := time.Now()
	for i := 0; i < 20; i++ {
		in.Title = fmt.Sprint("warm ", i)
		if _, _, err := ta.svc.UpdateTask(ctx, id, in); err != nil {
			t.Fatal(err)
		}
	}
	typical := time.Since(t0) / 20
	for i := 0; i < 100; i++ {
		if _, err := ta.svc.GetTask(ctx, id); err != nil { // cache the current row
			t.Fatal(err)
		}
		in.Title = fmt.Sprint("attempt ", i)
		cctx, cancel := context.WithCancel(ctx)
		time.AfterFunc(time.Duration(rand.Int64N(int64(typical*3/2)+1)), cancel)
		_, _, err := ta.svc.UpdateTask(cctx, id, in)
		cancel()
		if err != nil {
			t.Fatalf("attempt %d: a write whose request was cancelled returned %v", i, err)
		}
		if got, _ := ta.svc.GetTask(ctx, id); got.Title != in.Title {
			t.Fatalf("attempt %d: the cache serves %q after the write of %q", i, got.Title, in.Title)
		}
	}
}
