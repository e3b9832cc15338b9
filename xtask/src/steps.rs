//! Named, timed steps: each prints a header and its duration; the first failure stops
//! the task with the step's name.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A sequence of steps of one task.
pub struct Steps {
    task: &'static str,
    started: Instant,
    count: usize,
}

impl Steps {
    pub fn new(task: &'static str) -> Self {
        Self {
            task,
            started: Instant::now(),
            count: 0,
        }
    }

    /// Runs one step; an error is returned with the step's name as context.
    pub fn run<T>(&mut self, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        self.count += 1;
        println!("\n==> [{} {}] {name}", self.task, self.count);
        let started = Instant::now();
        let result = step();
        let elapsed = format_duration(started.elapsed());
        match &result {
            Ok(_) => println!("<== [{} {}] {name}: ok ({elapsed})", self.task, self.count),
            Err(_) => println!(
                "<== [{} {}] {name}: FAILED ({elapsed})",
                self.task, self.count
            ),
        }
        result.with_context(|| format!("{} step '{name}' failed", self.task))
    }

    /// Prints the summary line after the last step.
    pub fn finish(self) {
        println!(
            "\n{}: all {} steps passed in {}",
            self.task,
            self.count,
            format_duration(self.started.elapsed())
        );
    }
}

/// `0.4 s`, `12.3 s`, `2 min 05 s`.
pub fn format_duration(duration: Duration) -> String {
    let tenths = duration.as_millis() / 100;
    if tenths < 600 {
        format!("{}.{} s", tenths / 10, tenths % 10)
    } else {
        let seconds = duration.as_secs();
        format!("{} min {:02} s", seconds / 60, seconds % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    #[test]
    fn durations_are_readable() {
        assert_eq!(format_duration(Duration::from_millis(0)), "0.0 s");
        assert_eq!(format_duration(Duration::from_millis(420)), "0.4 s");
        assert_eq!(format_duration(Duration::from_millis(12_345)), "12.3 s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2 min 05 s");
    }

    #[test]
    fn a_failing_step_names_itself_and_stops() {
        let mut steps = Steps::new("test");
        assert_eq!(steps.run("first", || Ok(1)).expect("first passes"), 1);
        let error = steps
            .run("clippy", || -> Result<()> { bail!("lint") })
            .expect_err("clippy fails");
        assert_eq!(error.to_string(), "test step 'clippy' failed");
        assert_eq!(error.root_cause().to_string(), "lint");
    }
}
