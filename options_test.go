package cacheaside

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestNewValidatesOptions(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", ContextTimeoutEnabled: true})
	defer rdb.Close()
	if _, err := New[string](nil, nil); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("nil client: %v", err)
	}
	var nilClient *redis.Client
	var nilCluster *redis.ClusterClient
	var nilRing *redis.Ring
	for _, r := range []Redis{nilClient, nilCluster, nilRing} {
		if _, err := New[string](r, nil); !errors.Is(err, ErrInvalidOptions) {
			t.Fatalf("typed nil %T: New = %v, want ErrInvalidOptions", r, err)
		}
	}
	c, err := New[string](rdb, nil)
	if err != nil {
		t.Fatalf("nil options: %v", err)
	}
	if c.Name() != defaultName || c.opts.LoadTimeout != defaultLoadTimeout || c.opts.LeaseTTL != defaultLeaseTTL ||
		c.opts.Codec.Format() != formatJSON || c.opts.MaxValueSize != defaultMaxValueSize || c.opts.Policy.TTL != defaultTTL {
		t.Fatalf("defaults not applied: %+v", c.opts)
	}
	_ = c.Close()
	for name, o := range map[string]*Options[string]{
		"negative TTL":          {Policy: Policy{TTL: -time.Second}},
		"negative negative TTL": {Policy: Policy{NegativeTTL: -time.Second}},
		"jitter 1":              {Policy: Policy{Jitter: 1}},
		"jitter -0.1":           {Policy: Policy{Jitter: -0.1}},
		"negative LoadTimeout":  {LoadTimeout: -1},
		"negative LeaseTTL":     {LeaseTTL: -1},
		"tiny LeaseTTL":         {LeaseTTL: time.Millisecond},
		"negative PollMin":      {PollMin: -1},
		"PollMax below PollMin": {PollMin: 10 * time.Millisecond, PollMax: time.Millisecond},
		"negative MaxValueSize": {MaxValueSize: -1},
		"negative MaxKeySize":   {MaxKeySize: -1},
		"name too long":         {Name: strings.Repeat("n", 129)},
	} {
		if _, err := New(rdb, o); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%s: New = %v, want ErrInvalidOptions", name, err)
		}
	}
}

func TestNewWarnsWithoutContextTimeout(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer rdb.Close()
	c, err := New(rdb, &Options[string]{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !strings.Contains(buf.String(), "ContextTimeoutEnabled") {
		t.Fatalf("no warning logged: %q", buf.String())
	}
	buf.Reset()
	rdb2 := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", ContextTimeoutEnabled: true})
	defer rdb2.Close()
	c2, _ := New(rdb2, &Options[string]{Logger: log})
	defer c2.Close()
	if buf.Len() != 0 {
		t.Fatalf("warning logged for a well-configured client: %q", buf.String())
	}
}
