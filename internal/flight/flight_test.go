package flight

import (
	"testing"
)

func TestJoinTellsWhoLeads(t *testing.T) {
	var g Group[int]
	c1, lead1 := g.Join("k")
	c2, lead2 := g.Join("k")
	if !lead1 || lead2 || c1 != c2 {
		t.Fatalf("first Join leads %v, second %v, same call %v", lead1, lead2, c1 == c2)
	}
	g.Finish("k", c1, 7, nil)
	<-c2.Done()
	if v, err := c2.Result(); v != 7 || err != nil {
		t.Fatalf("joined result %d, %v", v, err)
	}
	if _, lead := g.Join("k"); !lead {
		t.Fatal("a Join after Finish did not start a new flight")
	}
}

func TestForgetStartsNewFlightKeepsOld(t *testing.T) {
	var g Group[int]
	old, _ := g.Join("k")
	g.Forget("k")
	fresh, lead := g.Join("k")
	if !lead || fresh == old {
		t.Fatal("Join after Forget joined the old flight")
	}
	g.Finish("k", old, 1, nil) // must not end the new flight's entry
	if c, lead := g.Join("k"); lead || c != fresh {
		t.Fatal("finishing the forgotten flight removed the new one")
	}
	g.Finish("k", fresh, 2, nil)
	<-old.Done()
	if v, _ := old.Result(); v != 1 {
		t.Fatalf("the forgotten flight's callers got %d", v)
	}
}

func TestPublishWakesEarlyBeforeFinish(t *testing.T) {
	var g Group[int]
	c, _ := g.Join("k")
	ran := 0
	before := func() {
		select {
		case <-c.Early():
			t.Error("before ran after Early closed")
		default:
		}
		ran++
	}
	if !c.Publish(3, nil, before) {
		t.Fatal("the first Publish refused")
	}
	if c.Publish(5, nil, before) {
		t.Fatal("a second Publish accepted")
	}
	if ran != 1 {
		t.Fatalf("before ran %d times, want once (for the Publish that answered)", ran)
	}
	select {
	case <-c.Early():
	default:
		t.Fatal("Early not closed after Publish")
	}
	select {
	case <-c.Done():
		t.Fatal("Done closed by Publish")
	default:
	}
	if v, _ := c.EarlyResult(); v != 3 {
		t.Fatalf("early result %d", v)
	}
	if j, lead := g.Join("k"); lead || j != c {
		t.Fatal("a Join after Publish did not join the running flight")
	}
	g.Finish("k", c, 4, nil)
	<-c.Done()
	if v, _ := c.Result(); v != 4 {
		t.Fatalf("result %d after an early 3", v)
	}
	if v, _ := c.EarlyResult(); v != 3 {
		t.Fatalf("early result %d after Finish", v)
	}
}

func TestFinishWithoutPublishClosesEarly(t *testing.T) {
	var g Group[int]
	c, _ := g.Join("k")
	g.Finish("k", c, 4, nil)
	<-c.Early()
	if v, _ := c.EarlyResult(); v != 4 || !c.Finished() {
		t.Fatalf("first result %d, finished %v", v, c.Finished())
	}
	if c.Publish(5, nil, func() { t.Error("before ran for a refused Publish") }) {
		t.Fatal("Publish after Finish accepted")
	}
}
