package cacheaside

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/internal/envelope"
)

// A wake-up message can arrive late: pub/sub hands it over after the fill
// it reports was overwritten or invalidated, and after a Get that began
// later started waiting on another holder's lease. Such a Get must not take
// the message's entry as its answer: only the fill of the lease it waits
// for answers it.
func TestLateWakeMessageIgnored(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		key := b.key("k")
		w := startContended(t, b, key, "new")
		// The late message: a value entry of an earlier lease (another
		// token), with that lease's proof.
		tok, proof := newLease()
		old, _, err := w.waiter.encode("invalidated long ago", tok, envelope.Gen{}, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		w.waiter.wake.wake(fmt.Sprintf("%d:%s%s%s", len(key), key, proof[:], old))
		close(w.release)
		if v := <-w.got; v != "new" {
			t.Fatalf("the waiter returned %q, want the holder's fill \"new\"", v)
		}
		<-w.done
	})
}

// TestForgedWakeMessage: a client that may only read and publish reads the
// contended lease's token with GET and publishes, on the wake channel, an
// entry of its own under that token: without a proof, with a random one,
// with the token as its proof. The waiter must not take any of them: it
// answers with the holder's fill.
func TestForgedWakeMessage(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b *backend) {
		ctx := context.Background()
		key := b.key("forged")
		w := startContended(t, b, key, "the holder's")
		waiter := w.waiter
		var lease envelope.Entry
		if err := envelope.Decode(b.raw(t, key), &lease); err != nil || lease.Kind != envelope.Lease {
			t.Fatalf("the lease entry: %v %v", lease.Kind, err)
		}
		forged, _, err := waiter.encode("forged", lease.Token, envelope.Gen{}, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		random := newToken()
		prefix := fmt.Sprintf("%d:%s", len(key), key)
		for _, msg := range []string{
			prefix + string(forged),
			prefix + string(random[:]) + string(forged),
			prefix + string(lease.Token[:]) + string(forged),
		} {
			if n, err := b.client(t).Publish(ctx, waiter.wake.channel, msg).Result(); err != nil || n == 0 {
				t.Fatalf("PUBLISH: %d receivers, %v", n, err)
			}
		}
		// The messages reach the waiter before the fill's (one connection
		// delivers them in order); give it time to act on them.
		select {
		case v := <-w.got:
			t.Fatalf("the waiter returned %q before the holder filled", v)
		case <-time.After(300 * time.Millisecond):
		}
		close(w.release)
		if v := <-w.got; v != "the holder's" {
			t.Fatalf("the waiter returned %q, want the holder's fill", v)
		}
		<-w.done
	})
}

func TestWakeMessageProof(t *testing.T) {
	tok, proof := newLease()
	entry := []byte("entry")
	for _, c := range []struct {
		name string
		msg  string
		want bool
	}{
		{"the holder's", "3:key" + string(proof[:]) + "entry", true},
		{"token as proof", "3:key" + string(tok[:]) + "entry", false},
		{"no proof", "3:key" + "entry", false},
		{"key only", "3:key", false},
	} {
		key, m, ok := parseWake(c.msg)
		if got := ok && key == "key" && m.answers(tok) && string(m.entry) == string(entry); got != c.want {
			t.Errorf("%s: answers %v, want %v (parsed %q %v)", c.name, got, c.want, key, ok)
		}
	}
}

// contended is a holder's Get of a key, gated in its loader, and another
// Cache's Get of the key waiting on the holder's lease.
type contended struct {
	waiter  *Cache[string]
	release chan struct{} // close it: the holder's loader returns its value
	got     chan string   // the waiter's answer (or its error's text)
	done    chan string   // the holder's answer
}

// startContended returns once the waiter waits on the holder's lease of
// key; the holder's loader returns v when release is closed.
func startContended(t *testing.T, b *backend, key, v string) *contended {
	t.Helper()
	holder, waiter := newCache[string](t, b, nil), newCache[string](t, b, nil)
	if waiter.wake == nil {
		t.Fatal("no wake channel")
	}
	waitFor(t, "the wake channel", waiter.wake.live.Load)
	ctx := context.Background()
	w := &contended{waiter: waiter, release: make(chan struct{}), got: make(chan string, 1), done: make(chan string, 1)}
	started := make(chan struct{})
	go func() {
		got, _ := holder.Get(ctx, key, func(context.Context) (string, error) { close(started); <-w.release; return v, nil })
		w.done <- got
	}()
	<-started // the holder has the lease
	go func() {
		got, err := waiter.Get(ctx, key, func(context.Context) (string, error) { return "loaded by the waiter", nil })
		if err != nil {
			got = err.Error()
		}
		w.got <- got
	}()
	waitFor(t, "the waiter to wait on the lease", func() bool { return waiter.Stats().LeaseContended == 1 })
	return w
}
