//! User-agent classification: browser family, OS family, and whether the client is a bot
//! (crawlers and link unfurlers such as Slackbot, Twitterbot, facebookexternalhit), so bot
//! clicks are reported apart from human ones. Pure; runs on the aggregator thread, never on the
//! redirect path (parsing a user agent costs microseconds).

/// Substrings (lower-case) of user agents that fetch links without a human behind them: chat and
/// social unfurlers, search and SEO crawlers, monitors, and HTTP libraries.
const BOT_MARKERS: &[(&str, &str)] = &[
    ("slackbot", "Slackbot"),
    ("slack-imgproxy", "Slackbot"),
    ("twitterbot", "Twitterbot"),
    ("facebookexternalhit", "facebookexternalhit"),
    ("facebookcatalog", "facebookexternalhit"),
    ("discordbot", "Discordbot"),
    ("linkedinbot", "LinkedInBot"),
    ("telegrambot", "TelegramBot"),
    ("whatsapp", "WhatsApp"),
    ("skypeuripreview", "SkypeUriPreview"),
    ("applebot", "Applebot"),
    ("googlebot", "Googlebot"),
    ("adsbot-google", "Googlebot"),
    ("google-inspectiontool", "Googlebot"),
    ("bingbot", "Bingbot"),
    ("bingpreview", "Bingbot"),
    ("yandexbot", "YandexBot"),
    ("baiduspider", "Baiduspider"),
    ("duckduckbot", "DuckDuckBot"),
    ("ahrefsbot", "AhrefsBot"),
    ("semrushbot", "SemrushBot"),
    ("petalbot", "PetalBot"),
    ("pinterestbot", "Pinterestbot"),
    ("redditbot", "redditbot"),
    ("embedly", "Embedly"),
    ("iframely", "Iframely"),
    ("uptimerobot", "UptimeRobot"),
    ("pingdom", "Pingdom"),
    ("curl/", "curl"),
    ("wget/", "Wget"),
    ("python-requests", "python-requests"),
    ("python-urllib", "python-urllib"),
    ("go-http-client", "Go-http-client"),
    ("okhttp", "okhttp"),
    ("headlesschrome", "HeadlessChrome"),
];

/// Generic words that mark a bot when no known name matched.
const BOT_WORDS: &[&str] = &["bot", "crawler", "spider", "crawl", "preview", "scanner"];

/// What a user agent says about its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentClass {
    /// Browser family ("Chrome", "Firefox", ...) or, for bots, the bot's name.
    pub browser: String,
    /// OS family ("Windows 10", "Mac OSX", "Android", ...), "unknown" when it does not say.
    pub os: String,
    pub bot: bool,
}

const UNKNOWN: &str = "unknown";

/// Classifies a `User-Agent` header value (missing or empty counts as an unknown bot-free
/// client: real browsers always send one, but so little is known that it is not called a bot).
pub fn classify(user_agent: &str) -> AgentClass {
    let lower = user_agent.to_ascii_lowercase();
    if let Some((_, name)) = BOT_MARKERS
        .iter()
        .find(|(marker, _)| lower.contains(marker))
    {
        return AgentClass {
            browser: (*name).to_owned(),
            os: UNKNOWN.to_owned(),
            bot: true,
        };
    }
    let parsed = woothee::parser::Parser::new().parse(user_agent);
    let (browser, os, crawler) = match &parsed {
        Some(result) => (
            known(result.name),
            known(result.os),
            result.category == "crawler",
        ),
        None => (UNKNOWN.to_owned(), UNKNOWN.to_owned(), false),
    };
    let bot = crawler || BOT_WORDS.iter().any(|word| lower.contains(word));
    AgentClass { browser, os, bot }
}

fn known(value: &str) -> String {
    if value.is_empty() || value == woothee::woothee::VALUE_UNKNOWN {
        UNKNOWN.to_owned()
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_and_systems() {
        let chrome = classify("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36");
        assert_eq!(chrome.browser, "Chrome");
        assert_eq!(chrome.os, "Windows 10");
        assert!(!chrome.bot);
        let firefox = classify(
            "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
        );
        assert_eq!(firefox.browser, "Firefox");
        assert_eq!(firefox.os, "Linux");
        let safari = classify("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1");
        assert_eq!(safari.browser, "Safari");
        assert_eq!(safari.os, "iPhone");
        assert!(!safari.bot);
    }

    #[test]
    fn unfurlers_and_crawlers_are_bots() {
        for (agent, name) in [
            (
                "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
                "Slackbot",
            ),
            ("Twitterbot/1.0", "Twitterbot"),
            (
                "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
                "facebookexternalhit",
            ),
            (
                "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
                "Googlebot",
            ),
            (
                "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
                "Discordbot",
            ),
            ("curl/8.4.0", "curl"),
        ] {
            let class = classify(agent);
            assert!(class.bot, "{agent}");
            assert_eq!(class.browser, name, "{agent}");
        }
        assert!(classify("SomeNewCrawler/0.1").bot);
        assert!(classify("Mozilla/5.0 (compatible; ExampleBot/1.0)").bot);
    }

    #[test]
    fn empty_agents_are_unknown_humans() {
        let empty = classify("");
        assert_eq!(empty.browser, "unknown");
        assert!(!empty.bot);
    }
}
