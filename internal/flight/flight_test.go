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
