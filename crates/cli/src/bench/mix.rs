//! The mixed workload's ratio and the order in which one client interleaves its operations.

use std::str::FromStr;

/// One operation of a legitimate client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Op {
    Resolve,
    Register,
    KeepAlive,
}

impl Op {
    const ALL: [Op; 3] = [Op::Resolve, Op::Register, Op::KeepAlive];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Resolve => "resolve",
            Op::Register => "register",
            Op::KeepAlive => "keepalive",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Most weight of one operation in `--mix`: ratios, not counts.
const WEIGHT_MAX: u32 = 1_000;

/// `--mix R:W:K`: resolves, registrations and keep-alives in this ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mix {
    weights: [u32; 3],
}

impl Mix {
    pub(crate) fn only(op: Op) -> Mix {
        let mut weights = [0; 3];
        weights[op.index()] = 1;
        Mix { weights }
    }

    pub(crate) fn weight(&self, op: Op) -> u32 {
        self.weights[op.index()]
    }

    pub(crate) fn has(&self, op: Op) -> bool {
        self.weight(op) > 0
    }

    pub(crate) fn text(&self) -> String {
        let [r, w, k] = self.weights;
        format!("{r}:{w}:{k}")
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(text: &str) -> Result<Mix, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let [r, w, k] = parts.as_slice() else {
            return Err(format!(
                "{text:?} is not RESOLVES:REGISTRATIONS:KEEPALIVES, e.g. 80:15:5"
            ));
        };
        let mut weights = [0u32; 3];
        for (slot, part) in weights.iter_mut().zip([r, w, k]) {
            *slot = part
                .trim()
                .parse()
                .map_err(|_| format!("{part:?} in {text:?} is not a whole number"))?;
            if *slot > WEIGHT_MAX {
                return Err(format!("{slot} in {text:?} is above {WEIGHT_MAX}"));
            }
        }
        if weights == [0; 3] {
            return Err(format!("{text:?} has no operation with a weight above 0"));
        }
        Ok(Mix { weights })
    }
}

/// Smooth weighted round robin (as nginx balances upstreams): within every run of
/// `sum(weights)` operations each appears exactly its weight's times, spread out rather than in
/// bursts, and the order is the same on every run.
pub(crate) struct Schedule {
    mix: Mix,
    credit: [i64; 3],
}

impl Schedule {
    pub(crate) fn new(mix: Mix) -> Schedule {
        Schedule {
            mix,
            credit: [0; 3],
        }
    }

    pub(crate) fn next_op(&mut self) -> Op {
        let total: i64 = self.mix.weights.iter().map(|&w| i64::from(w)).sum();
        let mut best = Op::Resolve;
        for op in Op::ALL {
            self.credit[op.index()] += i64::from(self.mix.weight(op));
            if self.mix.has(op)
                && (!self.mix.has(best) || self.credit[op.index()] > self.credit[best.index()])
            {
                best = op;
            }
        }
        self.credit[best.index()] -= total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(mix: Mix, n: usize) -> [usize; 3] {
        let mut schedule = Schedule::new(mix);
        let mut counts = [0; 3];
        for _ in 0..n {
            counts[schedule.next_op().index()] += 1;
        }
        counts
    }

    #[test]
    fn every_window_of_the_weights_sum_holds_each_operation_its_weight_times() {
        let mix: Mix = "80:15:5".parse().unwrap();
        assert_eq!(counts(mix, 100), [80, 15, 5]);
        assert_eq!(counts(mix, 1_000), [800, 150, 50]);
        let mix: Mix = "0:1:1".parse().unwrap();
        assert_eq!(counts(mix, 10), [0, 5, 5]);
        assert_eq!(counts(Mix::only(Op::Register), 7), [0, 7, 0]);
    }

    #[test]
    fn operations_are_spread_out_not_bunched() {
        let mut schedule = Schedule::new("50:50:0".parse().unwrap());
        let ops: Vec<Op> = (0..6).map(|_| schedule.next_op()).collect();
        for pair in ops.windows(2) {
            assert_ne!(pair[0], pair[1], "{ops:?}");
        }
    }

    #[test]
    fn a_mix_that_is_not_three_small_whole_numbers_is_refused() {
        for bad in [
            "",
            "80:20",
            "80:15:5:1",
            "a:1:1",
            "-1:1:1",
            "0:0:0",
            "1001:0:0",
        ] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?} was accepted");
        }
        assert!("1000:0:0".parse::<Mix>().is_ok());
        assert_eq!("80:15:5".parse::<Mix>().unwrap().text(), "80:15:5");
    }
}
